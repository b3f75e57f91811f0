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
from .checks import read_checks, score
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
            row[f"{name}_kl_sum"] = float((t_logp.exp() * (t_logp - other.log_softmax(-1))).sum())
            kl_sums[name] += row[f"{name}_kl_sum"]
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
    """95% bootstrap intervals over the held-out queries: agreement and KL pooled over the drawn queries'
    answer tokens (ratios, as the point estimates are), free-answer ROUGE-L and exact match as means. The
    `*_gain` entries are paired (student minus baseline in each draw; KL: baseline minus student), so an
    interval above 0 says the artifact beats no prompt at all."""
    import numpy as np

    draws = np.random.default_rng(seed).integers(0, len(rows), size=(n, len(rows)))

    def stat(values, weights=None):
        v = np.array(values, dtype=float)[draws]
        return v.mean(-1) if weights is None else v.sum(-1) / np.array(weights, dtype=float)[draws].sum(-1)

    def interval(x):
        return [float(v) for v in np.percentile(x, [2.5, 97.5])]

    tokens = [r["answer_tokens"] for r in rows]
    out = {"resampled": "held-out queries", "n_boot": n, "seed": seed}
    per = {}
    for who in ("student", "baseline"):
        per[who] = {
            "agreement": stat([r[f"{who}_agreeing"] for r in rows], tokens),
            "kl": stat([r[f"{who}_kl_sum"] for r in rows], tokens),
            "answer_rougeL": stat([r[f"{who}_rougeL"] for r in rows]),
            "answer_exact_match": stat([r[f"{who}_exact_match"] for r in rows]),
        }
        out.update({f"{who}_{name}": interval(x) for name, x in per[who].items()})
    for name in ("agreement", "answer_rougeL"):
        out[f"{name}_gain"] = interval(per["student"][name] - per["baseline"][name])
    out["kl_gain"] = interval(per["baseline"]["kl"] - per["student"]["kl"])
    return out


def check_rates(rows: list[dict], who: tuple[str, ...], n: int = 1000, seed: int = 0) -> dict:
    """Pass rates of the task checks per answerer with 95% bootstrap intervals over the checks, and the
    student's gap to the teacher (paired)."""
    import numpy as np

    draws = np.random.default_rng(seed).integers(0, len(rows), size=(n, len(rows)))
    passed = {w: np.array([float(r[f"{w}_passed"]) for r in rows]) for w in who}
    out: dict = {"checks": len(rows), "resampled": "checks", "n_boot": n, "seed": seed}
    for w in who:
        out[f"{w}_pass_rate"] = float(passed[w].mean())
        out[f"{w}_pass_rate_95"] = [float(v) for v in np.percentile(passed[w][draws].mean(-1), [2.5, 97.5])]
    gap = (passed["student"] - passed["teacher"])[draws].mean(-1)
    out["student_minus_teacher"] = float((passed["student"] - passed["teacher"]).mean())
    out["student_minus_teacher_95"] = [float(v) for v in np.percentile(gap, [2.5, 97.5])]
    return out


def verdict(result: dict) -> tuple[str, str | None]:
    """The one line a user reads at the end of compress, and a warning line when the artifact is not
    measurably closer to the full-prompt model than no prompt at all (None otherwise)."""
    ci = result["intervals_95"]

    def pct(x):
        return f"{100 * x:.1f}%"

    def span(key, fmt):
        return f"[{fmt(ci[key][0])}, {fmt(ci[key][1])}]"

    def f3(x):
        return f"{x:.3f}"

    def f2(x):
        return f"{x:.2f}"

    line = (
        f"fidelity on {result['records']} held-out queries, {result['num_gist']} tokens for a "
        f"{result.get('prompt_tokens')}-token prompt: agreement {pct(result['student_agreement'])} "
        f"{span('student_agreement', pct)} vs no prompt {pct(result['baseline_agreement'])}; "
        f"KL {f3(result['student_kl'])} {span('student_kl', f3)} vs {f3(result['baseline_kl'])}; "
        f"answer ROUGE-L {f2(result['student_answer_rougeL'])} {span('student_answer_rougeL', f2)} "
        f"vs {f2(result['baseline_answer_rougeL'])}"
    )
    checks = result.get("checks")
    if checks and checks["checks"]:
        line += (
            f"; checks passed (of {checks['checks']}): teacher {pct(checks['teacher_pass_rate'])}, "
            f"student {pct(checks['student_pass_rate'])} {_bracket(checks['student_pass_rate_95'], pct)}, "
            f"no prompt {pct(checks['baseline_pass_rate'])}"
        )
    low, high = ci["kl_gain"]
    if low > 0:
        return line, None
    worse = result["student_kl"] >= result["baseline_kl"]
    return line, (
        f"WARNING: the artifact is {'further from' if worse else 'not measurably closer to'} the full-prompt model "
        f"than no prompt at all (KL gain over no prompt {result['baseline_kl'] - result['student_kl']:.3f}, 95% "
        f"[{low:.3f}, {high:.3f}]); train longer (train.max_steps), on more queries (--num-queries, --queries) or "
        f"with more tokens (--num-gist)"
    )


def _bracket(pair, fmt) -> str:
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


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


def checks_result(run: Path, records: list[dict], answers: dict) -> dict | None:
    """The task checks of RUN/compress_data/checks.jsonl scored on the held-out answers (None without
    checks). A check whose query the teacher answered with nothing has no record: counted, not scored."""
    path = run / "compress_data" / "checks.jsonl"
    if not path.is_file():
        return None
    checks = read_checks(path)
    by_query = {r["input"]: i for i, r in enumerate(records)}
    scored = [c for c in checks if c.query in by_query]
    texts = {
        "teacher": {c.query: records[by_query[c.query]]["output"].strip() for c in scored},
        **{who: {c.query: answers[who][by_query[c.query]] for c in scored} for who in ("student", "baseline")},
    }
    rows = score(scored, texts)
    write_text(run / "fidelity_checks.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if not rows:
        return {"checks": 0, "unscored_empty_teacher_answer": len(checks)}
    return {
        **check_rates(rows, ("teacher", "student", "baseline")),
        "unscored_empty_teacher_answer": len(checks) - len(scored),
    }


def evaluate_heldout(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    gm = GistModel.load(run)
    records = [json.loads(line) for line in (run / "compress_data" / "heldout.jsonl").read_text().splitlines()]
    max_new = gm.meta.get("answer_tokens", ANSWER_TOKENS)
    answers = free_answers(gm, records, max_new)
    means, rows = compare_answers(answers, [r["output"].strip() for r in records])
    forced, per_record = measure(gm, records)
    rows = [{**row, **counts} for row, counts in zip(rows, per_record)]
    result = {
        **forced,
        **means,
        "intervals_95": query_intervals(rows),
        "checks": checks_result(run, records, answers),
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
    line, warning = verdict(result)
    result["verdict"], result["warning"] = line, warning
    write_text(run / "fidelity.json", json.dumps(result, indent=2))
    return result
