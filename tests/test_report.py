"""`gist-dist report` on real runs: numbers come from every rank's metrics, eval.json when present, plots."""

from __future__ import annotations

import json
import shutil
import statistics

import matplotlib.image
import pytest

from conftest import TINY, gist_dist
from gist_dist.analysis.flops import forward_flops, shape_of
from gist_dist.analysis.summary import read_metrics, summarize

PEAK = 50.0  # GFLOP/s handed to the report, so MFU can be recomputed here exactly


def _report(args):
    gist_dist(["report", *args, "--peak-gflops", str(PEAK)], timeout=600)


def test_report_merges_every_rank(tiny_gist_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_gist_run, run, ignore=shutil.ignore_patterns("checkpoints", "final", "report*", "*.png"))
    (run / "eval.json").unlink(missing_ok=True)
    _report([str(run)])
    report = json.loads((run / "report.json").read_text())
    train = report["runs"][0]["train"]
    steps = [r for r in read_metrics(run) if "step" in r][1:]
    expected = [statistics.fmean(r["rank_tokens_per_s"][i] for r in steps) for i in range(2)]
    assert train["world_size"] == 2
    assert train["rank_tokens_per_s"] == pytest.approx(expected)
    assert train["tokens_per_s"] == pytest.approx(sum(expected))
    assert train["rank_peak_mem_gb"] == pytest.approx([max(r["rank_peak_mem_gb"][i] for r in steps) for i in range(2)])
    m = report["runs"][0]["mfu"]
    seq = m["mean_seq_tokens"]
    per_token = 3 * forward_flops(shape_of("tiny"), seq, 0, logits=seq) / seq
    assert m["mfu"] == pytest.approx(sum(expected) * per_token / 1e9 / PEAK)
    flops = report["runs"][0]["flops"]
    assert flops["reduction_vs_none"]["gist"] > 0 and flops["kv_bytes_per_prompt"]["gist"] > 0
    md = (run / "report.md").read_text()
    assert "| total |" in md and "MFU" in md and "No eval.json" in md
    for name in ("loss.png", "throughput.png", "strategies.png"):
        assert matplotlib.image.imread(run / name).shape[0] > 100


def test_report_of_several_runs_with_eval(tiny_gist_run, tmp_path):
    """A second real run with k=2, both evaluated: ROUGE-L vs k is plotted, eval tables are in."""
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    shutil.copytree(tiny_gist_run, k1, ignore=shutil.ignore_patterns("checkpoints", "report*", "*.png", "eval*"))
    gist_dist(["train", TINY, f"output_dir={k2}", "num_gist=2", "train.max_steps=3"], timeout=600)
    for run in (k1, k2):
        gist_dist(
            ["eval", str(run / "config.yaml"), f"output_dir={run}", "data.num_eval=4", "eval_max_new_tokens=8"],
            timeout=600,
        )
    (k2 / "flops.json").write_text("{not json")  # a broken optional input: the table is recomputed
    out = tmp_path / "report"
    _report([str(k1), str(k2), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert [r["train"]["num_gist"] for r in report["runs"]] == [1, 2]
    for run, r in zip((k1, k2), report["runs"]):
        ev = json.loads((run / "eval.json").read_text())["splits"]
        assert {name: s["rouge_l"] for name, s in r["eval"].items()} == {n: s["rougeL"] for n, s in ev.items()}
        assert r["flops"]["num_gist"] == r["train"]["num_gist"]
    assert (out / "rouge_vs_gist.png").is_file()
    assert "ROUGE-L" in (out / "report.md").read_text()
    # the summary `make demo` ends with: one line per held-out split, from eval.json's own figures
    held_out = [line for line in summarize(k2).splitlines() if line.startswith("held-out")]
    ev = json.loads((k2 / "eval.json").read_text())["splits"]
    assert [line.split(":")[0] for line in held_out] == [f"held-out {name}" for name in ev]
    for line, s in zip(held_out, ev.values()):
        assert f"exact match {s['exact_match']:.2f}, ROUGE-L {s['rougeL']:.2f} on {s['n']} tasks" in line
        assert f"in 2 gist token(s): {s['compression_ratio']['mean']:.1f}x compression" in line
    # then the first two held-out answers of each split, beside their instruction and reference
    outputs = [json.loads(line) for line in (k2 / "eval_outputs.jsonl").read_text().splitlines()]
    text = summarize(k2)
    for name in ev:
        first = [o for o in outputs if o["split"] == name][:2]
        assert text.count(f"example ({name}):") == len(first) == 2
        for o in first:
            assert f"  reference:   {' '.join(o['reference'].split())[:97]}" in text


def test_report_bad_input(tmp_path):
    proc = gist_dist(["report", str(tmp_path / "missing")], check=False, timeout=600)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "start", "world_size": 1}) + "\n")
    proc = gist_dist(["report", str(tmp_path)], check=False, timeout=600)
    assert proc.returncode == 1 and not (tmp_path / "report.json").exists()
