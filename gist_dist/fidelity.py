"""How faithfully k gist embeddings stand in for a prompt, on held-out queries.

For each held-out (prompt, query, teacher answer): teacher = frozen model with the full prompt;
student = same model with the gist embeddings instead of the prompt; baseline = no prompt and no
gist. On the answer tokens (teacher-forced) we report KL(teacher || x) and greedy next-token
agreement (argmax equal), for the student and the baseline.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .atomic import write_text
from .inference import GistModel
from .methods.finetune import labelled_rows


@torch.no_grad()
def _answer_logits(gm: GistModel, rec: dict, mode: str) -> torch.Tensor:
    template = gm.template
    if mode == "teacher":
        ex = template.encode(rec, with_gist=False)
    elif mode == "student":
        ex = template.encode(rec, with_prompt=False)
    else:
        ex = template.encode(rec, with_gist=False, with_prompt=False)
    logits = gm.logits(ex["input_ids"])
    return labelled_rows(logits[None], torch.tensor([ex["labels"]], device=logits.device))[0].float()


def measure(gm: GistModel, records: list[dict]) -> dict:
    sums = {"student": [0.0, 0], "baseline": [0.0, 0]}
    n_tokens = 0
    for rec in records:
        teacher = _answer_logits(gm, rec, "teacher")
        t_logp = teacher.log_softmax(-1)
        n_tokens += len(teacher)
        for name in sums:
            other = _answer_logits(gm, rec, name)
            kl = (t_logp.exp() * (t_logp - other.log_softmax(-1))).sum(-1)
            sums[name][0] += float(kl.sum())
            sums[name][1] += int((other.argmax(-1) == teacher.argmax(-1)).sum())
    return {"records": len(records), "answer_tokens": n_tokens,
            **{f"{name}_kl": s[0] / n_tokens for name, s in sums.items()},
            **{f"{name}_agreement": s[1] / n_tokens for name, s in sums.items()}}


def evaluate_heldout(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    gm = GistModel.load(run)
    records = [json.loads(line) for line in (run / "compress_data" / "heldout.jsonl").read_text().splitlines()]
    result = {**measure(gm, records), "num_gist": gm.meta["num_gist"],
              "prompt_tokens": gm.meta.get("prompt_tokens"), "compression_ratio": gm.meta.get("compression_ratio")}
    write_text(run / "fidelity.json", json.dumps(result, indent=2))
    return result
