"""Nothing of the user's data is dropped unless asked; metrics reach TensorBoard; progress in plain logs."""
from __future__ import annotations

import json

import pytest

from conftest import TINY, gist_dist, torchrun
from gist_dist.config import load_config
from gist_dist.data import DataStats, load_records


def _records(n: int) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "", "output": str(i)} for i in range(n)]


def test_every_record_of_a_file_is_used_by_default(tmp_path):
    path = tmp_path / "big.jsonl"  # more than the old silent default of 2000
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(2500)))
    cfg = load_config(TINY, [f"data.train={path}", "data.num_train=0", "data.num_eval=0"])
    assert load_config(None).data.num_train == 0 and load_config(None).data.num_eval == 0
    stats = DataStats()
    records = load_records(str(path), n=cfg.data.num_train, stats=stats)
    assert len(records) == 2500 and records[-1]["output"] == "2499"
    assert (stats.records, stats.source_records) == (2500, 2500)


def test_a_limit_is_applied_only_when_asked_and_counted(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_records(300)))
    stats = DataStats()
    records = load_records(str(path), n=100, stats=stats)
    assert [r["output"] for r in records] == [str(i) for i in range(100)]  # the first 100, in order
    assert (stats.records, stats.source_records) == (100, 300)


def test_log_backends_are_validated():
    from gist_dist.config import ConfigError
    with pytest.raises(ConfigError, match="unknown backend"):
        load_config(TINY, ["log.backends=jsonl,mlflow"])
    with pytest.raises(ConfigError, match="must include jsonl"):
        load_config(TINY, ["log.backends=tensorboard"])
    assert load_config(TINY, ["log.backends=jsonl,tensorboard"]).log.backends == ["jsonl", "tensorboard"]


def test_missing_logger_package_fails_before_anything_is_written(tmp_path):
    pytest.importorskip("tensorboard")  # the test environment has tensorboard, not wandb
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    out = tmp_path / "run"
    proc = gist_dist(["train", TINY, f"output_dir={out}", "log.backends=jsonl,wandb"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gist-dist: config error: log.backends has wandb")
    assert not out.exists()


def test_two_rank_run_logs_the_same_scalars_to_tensorboard_and_plain_progress_lines(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = torchrun(["train", TINY, f"output_dir={out}", "train.max_steps=4", "train.log_every=2",
                     "log.backends=jsonl,tensorboard", "data.num_train=64"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["data"]["records"] == 64 and start["data"]["source_records"] == 64
    assert "train records: 64 used of 64" in proc.stderr + proc.stdout
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # rank 0 only
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)
    assert [e.step for e in acc.Scalars("rank1/tokens_per_s")] == [1, 2, 3, 4]
    # Not a terminal: one plain line per log_every steps, no carriage-return bars.
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train[gist] step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
    assert "\r" not in proc.stderr
