"""A few lines about a finished run: loss before/after, throughput per rank, where outputs are, and (after
`gist-dist eval`) the held-out figures with a few examples side by side."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (did the run start?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(run_dir: str | Path) -> str:
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "step" in r]
    if not steps:
        raise FileNotFoundError(f"{run_dir}: metrics.jsonl has no training steps yet")
    start = next((r for r in rows if r.get("event") == "start"), {})
    timed = steps[1:] or steps  # the first step includes warm-up (JIT, allocation)
    per_rank = [
        sum(r["rank_tokens_per_s"][i] for r in timed) / len(timed) for i in range(len(timed[0]["rank_tokens_per_s"]))
    ]
    evals = [r["eval_loss"] for r in steps if "eval_loss" in r]
    out = Path(run_dir)
    lines = [
        f"run:          {out} (objective={start.get('objective')}, mask={start.get('mask')}, "
        f"k={start.get('num_gist')}, ranks={start.get('world_size')})",
        f"loss:         {steps[0]['loss']:.4f} (step 1) -> {steps[-1]['loss']:.4f} (step {steps[-1]['step']})",
        f"eval loss:    {evals[-1]:.4f}" if evals else "eval loss:    (none logged)",
        "tokens/s:     "
        + ", ".join(f"rank {i}: {v:.0f}" for i, v in enumerate(per_rank))
        + f" (total {sum(per_rank):.0f})",
        f"step time:    {sum(r['step_time_s'] for r in timed) / len(timed):.2f} s (mean after step 1)",
        "peak memory:  " + ", ".join(f"rank {i}: {v:.2f} GB" for i, v in enumerate(steps[-1]["rank_peak_mem_gb"])),
        f"outputs:      {out / 'metrics.jsonl'}, {out / 'checkpoints'}, "
        + (f"{out / 'final'}" if (out / "final").exists() else f"{out / 'gist.safetensors'}"),
    ]
    return "\n".join(lines + eval_lines(out) + example_lines(out))


def eval_lines(run_dir: Path) -> list[str]:
    """One line per held-out split of RUN/eval.json (written by `gist-dist eval`), none without it."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    return [
        f"held-out {name}: exact match {s['exact_match']:.2f}, ROUGE-L {s['rougeL']:.2f} on {s['n']} tasks, "
        f"prompt of {s['prompt_tokens']['mean']:.1f} tokens (mean) in {result['num_gist']} gist token(s): "
        f"{s['compression_ratio']['mean']:.1f}x compression"
        for name, s in result["splits"].items()
    ]


def example_lines(run_dir: Path, per_split: int = 2, width: int = 100) -> list[str]:
    """The first held-out answers of each split in RUN/eval_outputs.jsonl: instruction (and input), the
    reference, and the gist model's answer, which saw the instruction only through its gist tokens."""
    path = run_dir / "eval_outputs.jsonl"
    if not path.is_file():
        return []
    shown: dict[str, int] = {}
    lines = []
    for line in path.read_text().splitlines():
        o = json.loads(line)
        if shown.get(o["split"], 0) >= per_split:
            continue
        shown[o["split"]] = shown.get(o["split"], 0) + 1
        task = o["instruction"] + (f" | input: {o['input']}" if o["input"] else "")
        lines += [
            f"example ({o['split']}):",
            f"  instruction: {_clip(task, width)}",
            f"  reference:   {_clip(o['reference'], width)}",
            f"  gist model:  {_clip(o['prediction'], width)}",
        ]
    return lines


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= width else text[: width - 3] + "..."
