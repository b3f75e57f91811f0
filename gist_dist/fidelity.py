"""How faithfully k gist embeddings stand in for a prompt, on held-out queries.

For each held-out (prompt, query, teacher answer): teacher = frozen model with the full prompt;
student = same model with the gist embeddings instead of the prompt; baseline = no prompt and no
gist. On the answer tokens (teacher-forced) we report KL(teacher || x) and greedy next-token
agreement (argmax equal), for the student and the baseline. Then what a user sees: the student's
and the baseline's free greedy answers against the teacher's (the held-out record's answer, made
by the same greedy decoder with the same token budget): exact match and ROUGE-L per answer, their
means in fidelity.json, every answer in fidelity_answers.jsonl. Held-out queries are few (tens,
not thousands), so fidelity.json also gives 95% bootstrap intervals over the queries: a query's tokens agree
or not together, so the query, not the token, is what is resampled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .atomic import write_text
from .evaluation import exact_matches, rouge
from .inference import GistModel, greedy
from .methods.finetune import labelled_rows

ANSWER_TOKENS = 64  # free answers of artifacts that did not record the teacher's budget


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


def measure(gm: GistModel, records: list[dict]) -> tuple[dict, list[dict]]:
    """Teacher-forced KL and next-token agreement over all answer tokens, and per record its token
    count and agreeing tokens (for the query bootstrap)."""
    kl_sums = {"student": 0.0, "baseline": 0.0}
    per_record = []
    for rec in records:
        teacher = _answer_logits(gm, rec, "teacher")
        t_logp = teacher.log_softmax(-1)
        row = {"answer_tokens": len(teacher)}
        for name in kl_sums:
            other = _answer_logits(gm, rec, name)
            kl_sums[name] += float((t_logp.exp() * (t_logp - other.log_softmax(-1))).sum())
            row[f"{name}_agreeing"] = int((other.argmax(-1) == teacher.argmax(-1)).sum())
        per_record.append(row)
    n_tokens = sum(r["answer_tokens"] for r in per_record)
    return {
        "records": len(records),
        "answer_tokens": n_tokens,
        **{f"{name}_kl": kl / n_tokens for name, kl in kl_sums.items()},
        **{f"{name}_agreement": sum(r[f"{name}_agreeing"] for r in per_record) / n_tokens for name in kl_sums},
    }, per_record


def query_intervals(rows: list[dict], n: int = 1000, seed: int = 0) -> dict:
    """95% bootstrap intervals over the held-out queries: agreement as agreeing / answer tokens of the
    drawn queries (a ratio, as the point estimate is), free-answer ROUGE-L and exact match as means."""
    import numpy as np

    draws = np.random.default_rng(seed).integers(0, len(rows), size=(n, len(rows)))

    def interval(values, weights=None):
        v = np.array(values, dtype=float)[draws]
        stat = v.mean(-1) if weights is None else v.sum(-1) / np.array(weights, dtype=float)[draws].sum(-1)
        return [float(x) for x in np.percentile(stat, [2.5, 97.5])]

    tokens = [r["answer_tokens"] for r in rows]
    out = {"resampled": "held-out queries", "n_boot": n, "seed": seed}
    for who in ("student", "baseline"):
        out[f"{who}_agreement"] = interval([r[f"{who}_agreeing"] for r in rows], tokens)
        for metric in ("exact_match", "rougeL"):
            out[f"{who}_answer_{metric}"] = interval([r[f"{who}_{metric}"] for r in rows])
    return out


def free_answers(gm: GistModel, records: list[dict], max_new_tokens: int, batch_size: int = 8) -> dict:
    """Greedy answers of the student (gist in place of the prompt) and the baseline (neither)."""
    tok, run, out = gm.tok, gm.run, {"student": [], "baseline": []}
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        student = [gm.prompt_and_tail(r["input"]) for r in batch]
        plain = [
            gm.template.encode(r, with_gist=False, with_prompt=False, with_output=False)["input_ids"] for r in batch
        ]
        out["student"] += greedy(
            gm.model,
            [p for p, _ in student],
            [t for _, t in student],
            run.gist_ids,
            "gist",
            max_new_tokens,
            tok.eos_token_id,
            tok.pad_token_id,
            embed=run.embed,
            prefix=run.prefix,
        )[0]
        out["baseline"] += greedy(
            gm.model,
            [ids[:-1] for ids in plain],
            [ids[-1:] for ids in plain],
            [],
            "pos_control",
            max_new_tokens,
            tok.eos_token_id,
            tok.pad_token_id,
        )[0]
    return {who: [tok.decode(a, skip_special_tokens=True).strip() for a in answers] for who, answers in out.items()}


def compare_answers(answers: dict, references: list[str]) -> tuple[dict, list[dict]]:
    """Means of exact match and ROUGE-L against the teacher's answers, and the per-answer rows."""
    scores = {
        who: {
            "exact_match": exact_matches(preds, references),
            "rougeL": rouge(preds, references, use_aggregator=False)["rougeL"],
        }
        for who, preds in answers.items()
    }
    means = {f"{who}_answer_{m}": sum(v) / len(v) for who, s in scores.items() for m, v in s.items()}
    rows = [
        {
            "teacher": ref,
            **{who: answers[who][i] for who in answers},
            **{f"{who}_{m}": float(v[i]) for who, s in scores.items() for m, v in s.items()},
        }
        for i, ref in enumerate(references)
    ]
    return means, rows


def evaluate_heldout(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    gm = GistModel.load(run)
    records = [json.loads(line) for line in (run / "compress_data" / "heldout.jsonl").read_text().splitlines()]
    max_new = gm.meta.get("answer_tokens", ANSWER_TOKENS)
    means, rows = compare_answers(free_answers(gm, records, max_new), [r["output"].strip() for r in records])
    forced, per_record = measure(gm, records)
    rows = [{**row, **counts} for row, counts in zip(rows, per_record)]
    result = {
        **forced,
        **means,
        "intervals_95": query_intervals(rows),
        "answer_max_new_tokens": max_new,
        "num_gist": gm.meta["num_gist"],
        "prompt_tokens": gm.meta.get("prompt_tokens"),
        "compression_ratio": gm.meta.get("compression_ratio"),
        "template": gm.template.template,
    }
    write_text(
        run / "fidelity_answers.jsonl",
        "".join(json.dumps({"query": r["input"], **row}) + "\n" for r, row in zip(records, rows)),
    )
    write_text(run / "fidelity.json", json.dumps(result, indent=2))
    return result
