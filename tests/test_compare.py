"""`gist-dist eval --compare`: the share of the gap with a paired bootstrap 95% interval (synthetic runs)."""

import json
import random

import pytest

from conftest import gist_dist
from gist_dist.evaluation import compare_runs, exact_match, format_comparison, rouge

QUALITY = {"gist": 0.6, "pos_control": 0.8, "neg_control": 0.2}  # chance of answering right


def write_runs(root, n, seed=0):
    """Three runs over the same n references; each prediction is the reference with the mask's
    chance, else another answer; eval.json holds the scores of eval_outputs.jsonl as eval writes them."""
    rng = random.Random(seed)
    refs = [f"answer {i} is {rng.choice(['red', 'blue', 'green'])}" for i in range(n)]
    dirs = []
    for mask, p in QUALITY.items():
        preds = [r if rng.random() < p else rng.choice(["answer is red", "no idea", r.split()[-1]]) for r in refs]
        d = root / f"{mask}_{n}"
        d.mkdir()
        d.joinpath("eval_outputs.jsonl").write_text(
            "".join(
                json.dumps(
                    {"split": "dev", "index": i, "instruction": "x", "input": "", "reference": r, "prediction": q}
                )
                + "\n"
                for i, (r, q) in enumerate(zip(refs, preds))
            )
        )
        d.joinpath("eval.json").write_text(
            json.dumps(
                {
                    "mask": mask,
                    "splits": {
                        "dev": {"rougeL": rouge(preds, refs)["rougeL"], "exact_match": exact_match(preds, refs)}
                    },
                }
            )
        )
        dirs.append(d)
    return dirs


def test_interval_contains_the_point_estimate_and_shrinks_with_more_examples(tmp_path):
    widths = {}
    for n in (40, 400):
        table = compare_runs(*write_runs(tmp_path, n))["splits"]["dev"]
        for metric, s in table.items():
            ci = s["interval"]
            assert ci["low"] <= s["normalised"] <= ci["high"] and s["n"] == n and ci["n_boot"] == 1000
            widths[n, metric] = ci["high"] - ci["low"]
    for metric in ("rougeL", "exact_match"):
        assert widths[400, metric] < 0.6 * widths[40, metric]


def test_interval_is_seeded_and_paired(tmp_path):
    dirs = write_runs(tmp_path, 60)
    a, b = compare_runs(*dirs), compare_runs(*dirs)
    assert a == b  # seeded: the same interval every time
    other = compare_runs(*dirs, seed=1)["splits"]["dev"]["rougeL"]["interval"]
    assert other != a["splits"]["dev"]["rougeL"]["interval"]
    # gist identical to pos_control: every draw recovers exactly the whole gap (pairing, not two samples)
    (dirs[0] / "eval_outputs.jsonl").write_text((dirs[1] / "eval_outputs.jsonl").read_text())
    (dirs[0] / "eval.json").write_text((dirs[1] / "eval.json").read_text())
    ci = compare_runs(*dirs)["splits"]["dev"]["exact_match"]["interval"]
    assert ci["low"] == pytest.approx(1.0) and ci["high"] == pytest.approx(1.0)


def test_without_per_example_outputs_only_the_point_estimate(tmp_path):
    dirs = write_runs(tmp_path, 20)
    (dirs[2] / "eval_outputs.jsonl").unlink()
    s = compare_runs(*dirs)["splits"]["dev"]["rougeL"]
    assert s["interval"] is None and s["normalised"] is not None
    assert "n/a" in format_comparison(compare_runs(*dirs))


def test_cli_prints_the_interval(tmp_path):
    dirs = write_runs(tmp_path, 30)
    out = gist_dist(["eval", "--compare", *dirs, "--out", tmp_path / "cmp.md"]).stdout
    assert "95% interval" in out and "(n=30)" in out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    ci = saved["splits"]["dev"]["exact_match"]["interval"]
    assert ci["low"] <= ci["high"]
