"""Distributed evaluation of a trained run: gist KV cache -> greedy answers -> ROUGE-L and compression.

    gist-dist eval configs/tiny.yaml output_dir=DIR                      # one process
    torchrun --nproc_per_node 2 .venv/bin/gist-dist eval configs/tiny.yaml output_dir=DIR
    torchrun --nproc_per_node 2 .venv/bin/gist-dist eval configs/tiny.yaml output_dir=DIR --zero3
    gist-dist eval --compare RUN_gist RUN_pos_control RUN_neg_control  # share of the gap recovered

The comparison gives each share of the gap a paired bootstrap 95% interval: the examples of a split
(paired across the three runs by their place in eval_outputs.jsonl) are resampled with replacement
(n=1000, seeded), the share is recomputed from the resampled per-example scores (ROUGE-L per
example via the same rouge module, exact match), and the 2.5 / 97.5 percentiles are reported.

The run's model is DIR/final/ (objective=finetune) or the base model + DIR/gist.safetensors (distill),
loaded by inference.load_run, replicated on every rank or partitioned with ZeRO-3 (`--zero3`,
generate with synced_gpus). Encoder-decoder runs (T5) answer through inference.seq2seq's gist cache;
their kv_bytes count the cached encoder states (per layer + final output at the kept positions).
Records are sorted by prompt length and cut into batches once, globally; rank r takes batches
r, r + world, ... so every batch (and so every answer) is the same at any world size; rank 0
gathers the answers back into the original order, scores them and writes DIR/eval.json,
DIR/eval.md and DIR/eval_outputs.jsonl.

eval.json: {run, mask, num_gist, model, world_size, zero3, max_new_tokens, batch_size,
  splits: {NAME: {source, n, dropped_overlong, generate_s, rougeL, rouge1, rouge2, exact_match,
                  prompt_tokens: {mean, median, max}, compression_ratio: {mean, median, max},
                  kv_bytes_per_prompt: {cached, full_prompt}}}}
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

from . import dist, zero
from .atomic import write_text
from .config import MASKS, RunConfig
from .data import DataError, DataStats, GistTemplate, load_records
from .inference import RunModel, load_run
from .model import resolve_dtype

ROUGE_MODULE = Path(__file__).resolve().parent / "metrics" / "rouge.py"
CONTROL_MASKS = MASKS  # the three runs a comparison needs


def eval_splits(cfg: RunConfig) -> dict[str, str]:
    """Named evaluation sets: data.eval_splits, else the generated seen / unseen task families."""
    return dict(cfg.data.eval_splits) or {"seen": "generated:seen", "unseen": "generated:unseen"}


def load_run_model(cfg: RunConfig, zero3: bool = False) -> RunModel:
    """That run's model (inference.load_run), replicated or partitioned with ZeRO-3."""
    ds_config = None
    if zero3:
        stage3 = dataclasses.replace(cfg, zero=dataclasses.replace(cfg.zero, stage=3))
        ds_config = zero.deepspeed_config(stage3, zero.hidden_size_of(cfg), resolve_dtype(cfg.model.dtype))
    model_cfg = dataclasses.replace(cfg.model, name="", tokenizer="")  # the run's own base model
    return load_run(cfg.output_dir, model_cfg, ds_config)


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Record indices in batches of similar length (less padding); the same batches at any world size."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_answers(
    em: RunModel, examples: list[dict], batch_size: int, max_new_tokens: int, synced: bool = False
) -> list[dict]:
    """Greedy answers for `examples` ({"prompt": ids incl. gist, "tail": ids}) sharded over ranks;
    every rank returns all of them in the original order (with the KV bytes of each prompt's cache)."""
    rank, world = dist.rank(), dist.world()
    batches = plan_batches([len(e["prompt"]) + len(e["tail"]) for e in examples], batch_size)
    mine = batches[rank::world]
    if synced:  # ZeRO-3: every rank must run the same number of forwards; extra batches are discarded
        mine += [batches[0]] * (math.ceil(len(batches) / world) - len(mine))
    results = {}
    for n, batch in enumerate(mine):
        prompts = [examples[i]["prompt"] for i in batch]
        answers, cache = em.answer(prompts, [examples[i]["tail"] for i in batch], max_new_tokens, synced)
        if n >= len(batches[rank::world]):
            continue
        for i, ids, kv, full in zip(batch, answers, cache.nbytes(), cache.full_prompt_nbytes()):
            results[i] = {"answer_ids": ids, "kv_bytes": kv, "full_prompt_kv_bytes": full}
    merged = {}
    for part in dist.all_gather_object(results):
        merged.update(part)
    return [merged[i] for i in range(len(examples))]


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_matches(predictions: list[str], references: list[str]) -> list[bool]:
    """Per answer: equal to the reference up to case and whitespace."""
    return [_normalise(p) == _normalise(r) for p, r in zip(predictions, references)]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of answers equal to the reference up to case and whitespace."""
    return sum(exact_matches(predictions, references)) / max(len(references), 1)


def rouge(predictions: list[str], references: list[str], use_aggregator: bool = True) -> dict:
    """ROUGE F-measures through `evaluate` with the local module (no hub): means over examples, or
    (use_aggregator=False) one score per example."""
    import evaluate

    return evaluate.load(str(ROUGE_MODULE)).compute(
        predictions=predictions, references=references, use_aggregator=use_aggregator
    )


def summary_stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)}


def split_metrics(
    predictions: list[str],
    references: list[str],
    prompt_tokens: list[int],
    num_gist: int,
    kv_bytes: list[int],
    full_kv_bytes: list[int],
) -> dict:
    scores = rouge(predictions, references)
    return {
        "n": len(references),
        "rougeL": scores["rougeL"],
        "rouge1": scores["rouge1"],
        "rouge2": scores["rouge2"],
        "exact_match": exact_match(predictions, references),
        "prompt_tokens": summary_stats(prompt_tokens),
        "compression_ratio": summary_stats([p / num_gist for p in prompt_tokens]),
        "kv_bytes_per_prompt": {"cached": statistics.fmean(kv_bytes), "full_prompt": statistics.fmean(full_kv_bytes)},
    }


def run_eval(cfg: RunConfig, zero3: bool = False) -> dict | None:
    """Evaluate the run in cfg.output_dir on every split; rank 0 writes and returns the results."""
    if dist.discover().world_size > 1 or zero3:
        dist.init(cfg.timeout_s)
    splits = eval_splits(cfg)
    records = {
        name: load_records(
            src,
            split="seen",
            n=cfg.data.num_eval,
            seed=cfg.data.seed + 1,
            bad_records=cfg.data.bad_records,
            role="eval",
            columns=cfg.data.columns,
        )
        for name, src in splits.items()
    }
    em = load_run_model(cfg, zero3)
    template = GistTemplate(em.tok, em.gist_ids, cfg.data.max_length, "drop", em.template or cfg.data.template)
    result = {
        "run": str(cfg.output_dir),
        "mask": em.mask,
        "num_gist": len(em.gist_ids),
        "model": em.source,
        "world_size": dist.world(),
        "zero3": zero3,
        "max_new_tokens": cfg.eval_max_new_tokens,
        "batch_size": cfg.eval_batch_size,
        "splits": {},
    }
    outputs = []
    for name, recs in records.items():
        stats = DataStats()
        kept, examples = [], []
        for rec in recs:
            if template.encode(rec, stats, with_output=False) is None:  # prompt alone over max_length
                continue
            prompt, tail, _ = template.pieces(rec)
            kept.append(rec)
            # compression counts what the gist replaces: a visible prefix is kept, once per model
            examples.append({"prompt": prompt + em.gist_ids, "tail": tail, "prompt_tokens": len(prompt) - em.prefix})
        if not examples:
            raise DataError(f"{splits[name]}: every prompt is longer than data.max_length={cfg.data.max_length}")
        t0 = time.time()
        answers = generate_answers(em, examples, cfg.eval_batch_size, cfg.eval_max_new_tokens, synced=zero3)
        seconds = time.time() - t0
        predictions = [em.tok.decode(a["answer_ids"], skip_special_tokens=True).strip() for a in answers]
        references = [r["output"].strip() for r in kept]
        if dist.is_main():
            result["splits"][name] = {
                "source": splits[name],
                "dropped_overlong": stats.dropped_overlong,
                "generate_s": seconds,
                **split_metrics(
                    predictions,
                    references,
                    [e["prompt_tokens"] for e in examples],
                    len(em.gist_ids),
                    [a["kv_bytes"] for a in answers],
                    [a["full_prompt_kv_bytes"] for a in answers],
                ),
            }
            outputs += [
                {
                    "split": name,
                    "index": i,
                    "instruction": r["instruction"],
                    "input": r["input"],
                    "reference": ref,
                    "prediction": pred,
                }
                for i, (r, ref, pred) in enumerate(zip(kept, references, predictions))
            ]
    if not dist.is_main():
        return None
    out = Path(cfg.output_dir)
    write_text(out / "eval_outputs.jsonl", "".join(json.dumps(o) + "\n" for o in outputs))
    write_text(out / "eval.md", format_markdown(result))
    write_text(out / "eval.json", json.dumps(result, indent=2))
    return result


def format_markdown(result: dict) -> str:
    lines = [
        f"# Evaluation of {result['run']}",
        "",
        f"mask {result['mask']}, {result['num_gist']} gist token(s), model {result['model']}, "
        f"{result['world_size']} rank(s){' ZeRO-3' if result['zero3'] else ''}, greedy, "
        f"max {result['max_new_tokens']} new tokens",
        "",
        "| split | n | ROUGE-L | exact match | prompt tokens mean / median / max | "
        "compression mean / median / max | KV bytes/prompt cached vs full prompt |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["splits"].items():
        p, c, kv = s["prompt_tokens"], s["compression_ratio"], s["kv_bytes_per_prompt"]
        lines.append(
            f"| {name} | {s['n']} | {s['rougeL']:.4f} | {s['exact_match']:.4f} | "
            f"{p['mean']:.1f} / {p['median']:.1f} / {p['max']} | {c['mean']:.1f} / {c['median']:.1f} / "
            f"{c['max']:.1f} | {kv['cached']:,.0f} vs {kv['full_prompt']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def gap_recovered(gist: float, pos: float, neg: float) -> float | None:
    """Share of the gap from the neg_control floor to the pos_control ceiling that gist recovers."""
    return (gist - neg) / (pos - neg) if pos != neg else None


def per_example_scores(run_dir) -> dict[str, dict[str, list]]:
    """{split: {"reference": [...], "rougeL": [...], "exact_match": [...]}} from RUN/eval_outputs.jsonl
    ({} if absent)."""
    path = Path(run_dir) / "eval_outputs.jsonl"
    if not path.is_file():
        return {}
    rows: dict[str, list] = {}
    for line in path.read_text().splitlines():
        o = json.loads(line)
        rows.setdefault(o["split"], []).append(o)
    out = {}
    for split, items in rows.items():
        items.sort(key=lambda o: o["index"])
        preds, refs = [o["prediction"] for o in items], [o["reference"] for o in items]
        out[split] = {
            "reference": refs,
            "rougeL": rouge(preds, refs, use_aggregator=False)["rougeL"],
            "exact_match": [float(m) for m in exact_matches(preds, refs)],
        }
    return out


def bootstrap_gap(scores: dict[str, list[float]], n: int = 1000, seed: int = 0) -> dict | None:
    """Paired bootstrap 95% interval of the share of the gap: resample the examples (the same draw for
    the three runs), recompute each run's mean and the share. Draws with pos = neg are left out (counted)."""
    import numpy as np

    per_run = np.array([scores[mode] for mode in CONTROL_MASKS], dtype=float)  # [3, examples]
    draws = np.random.default_rng(seed).integers(0, per_run.shape[1], size=(n, per_run.shape[1]))
    gist, pos, neg = per_run[:, draws].mean(-1)  # [3, n]
    ok = pos != neg
    if not ok.any():
        return None
    share = (gist[ok] - neg[ok]) / (pos[ok] - neg[ok])
    low, high = np.percentile(share, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n_boot": n, "undefined_draws": int(n - ok.sum()), "seed": seed}


def compare_runs(
    gist_dir, pos_dir, neg_dir, metrics=("rougeL", "exact_match"), n_boot: int = 1000, seed: int = 0
) -> dict:
    """Per split (present in all three eval.json files): each mode's score, the normalised one, and its
    paired bootstrap 95% interval ("interval": None where the runs' eval_outputs.jsonl are missing or
    hold different examples)."""
    dirs = dict(zip(CONTROL_MASKS, (gist_dir, pos_dir, neg_dir)))
    results = {}
    for mode, d in dirs.items():
        path = Path(d) / "eval.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run gist-dist eval on {d} first)")
        results[mode] = json.loads(path.read_text())
    examples = {mode: per_example_scores(d) for mode, d in dirs.items()}
    splits = [s for s in results["gist"]["splits"] if all(s in r["splits"] for r in results.values())]
    table = {}
    for split in splits:
        table[split] = {}
        paired = [examples[mode].get(split) for mode in CONTROL_MASKS]
        paired = paired if all(paired) and all(p["reference"] == paired[0]["reference"] for p in paired) else None
        for metric in metrics:
            score = {mode: results[mode]["splits"][split][metric] for mode in CONTROL_MASKS}
            interval = paired and bootstrap_gap({m: p[metric] for m, p in zip(CONTROL_MASKS, paired)}, n_boot, seed)
            table[split][metric] = {
                **score,
                "normalised": gap_recovered(*score.values()),
                "interval": interval,
                "n": len(paired[0]["reference"]) if paired else None,
            }
    return {"runs": {mode: str(d) for mode, d in dirs.items()}, "splits": table}


def format_comparison(comparison: dict) -> str:
    lines = [
        "| split | metric | neg_control | gist | pos_control | gap recovered | 95% interval (paired bootstrap) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for split, per_metric in comparison["splits"].items():
        for metric, s in per_metric.items():
            norm = "n/a (pos = neg)" if s["normalised"] is None else f"{s['normalised']:.3f}"
            ci = s.get("interval")
            ci = (
                f"[{ci['low']:.3f}, {ci['high']:.3f}] (n={s['n']})"
                if ci
                else "n/a (pos = neg in every draw)"
                if s.get("n")
                else "n/a (no paired eval_outputs.jsonl)"
            )
            lines.append(
                f"| {split} | {metric} | {s['neg_control']:.4f} | {s['gist']:.4f} | "
                f"{s['pos_control']:.4f} | {norm} | {ci} |"
            )
    return "\n".join(lines) + "\n"
