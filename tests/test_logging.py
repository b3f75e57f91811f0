"""Logging: the backends are checked before anything is written, metrics reach TensorBoard and wandb
(offline), progress is a bar on a terminal and plain lines in logs."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, gist_dist, torchrun
from gist_dist.config import load_config


def test_log_backends_are_validated():
    from gist_dist.config import ConfigError

    with pytest.raises(ConfigError, match="log.backends must be one of jsonl, tensorboard, wandb, got .mlflow."):
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


def test_wandb_sink_is_offline_and_gets_the_scalars_of_metrics_jsonl(tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in module records what the sink calls (init, log, finish)."""
    import os
    import sys
    import types

    from gist_dist.metrics_log import MetricsLog, scalars

    calls = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"], calls["mode"] = kwargs, os.environ.get("WANDB_MODE")
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(TINY, ["log.backends=jsonl,wandb", f"output_dir={tmp_path}"])
    log = MetricsLog(cfg, main=True, fresh=True)
    steps = [
        {"step": 1, "loss": 2.5, "rank_tokens_per_s": [10.0, 12.0], "lr": 1e-4},
        {"step": 2, "loss": 2.0, "lr": 1e-4},
    ]
    log.record({"event": "start"})
    for r in steps:
        log.record(r)
    log.close()
    assert calls["mode"] == "offline" and calls["init"]["dir"] == str(tmp_path) and calls.get("finished")
    assert calls["init"]["config"]["log"]["backends"] == ["jsonl", "wandb"]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert calls["log"] == [(r["step"], scalars(r)) for r in written if "step" in r] and len(calls["log"]) == 2
    assert calls["log"][0][1]["rank1/tokens_per_s"] == 12.0


@pytest.mark.parametrize("mode", ["bar", "lines"])
def test_progress_is_a_bar_or_plain_lines(mode, capsys, monkeypatch):
    from gist_dist import metrics_log
    from gist_dist.metrics_log import Progress

    clock = iter([0, 60, 120])  # read at the start and at each printed line: 30 s a step
    # the eta is the mean step time so far times the steps left
    monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: next(clock))
    progress = Progress(total=4, initial=0, every=2, main=True, desc="train[gist]", mode=mode)
    for step in range(1, 5):
        progress.update(step, loss=1.0 / step, tokens_per_s=10.0, step_time=0.5)
    progress.close()
    err = capsys.readouterr().err
    if mode == "bar":  # tqdm redraws one line with carriage returns
        assert "\r" in err and "4/4" in err
    else:  # a Slurm output file: one line every 2 steps, no carriage return
        assert "\r" not in err and err.splitlines() == [
            "train[gist] step 2/4 loss 0.5000 tokens/s 10.0 step_time 0.50s eta 1.0 min",
            "train[gist] step 4/4 loss 0.2500 tokens/s 10.0 step_time 0.50s eta 0.0 min",
        ]


def test_two_rank_run_logs_the_same_scalars_to_tensorboard_and_plain_progress_lines(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = torchrun(
        [
            "train",
            TINY,
            f"output_dir={out}",
            "train.max_steps=4",
            "train.log_every=2",
            "log.backends=jsonl,tensorboard",
            "data.num_train=64",
        ]
    )
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
