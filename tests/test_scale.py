"""The scale proof's code path in CI time: benchmarks/scale_zero3.py with configs/scale.yaml (distill,
ZeRO-3 built under zero.Init, persistence threshold 0, 2 CPU ranks) on the tiny shape.

The tiny shape is small enough to be materialised once and loaded with from_pretrained; that load
also runs inside zero.Init (the 7B-layer shapes are built with from_config inside zero.Init)."""

from __future__ import annotations

import json
import math
import sys

from conftest import ROOT, run

SCRIPT = ROOT / "benchmarks" / "scale_zero3.py"


def test_tiny_scale_proof_shards_and_counts_bytes(tmp_path):
    out = tmp_path / "scale"
    run(
        [
            sys.executable,
            SCRIPT,
            ROOT / "configs" / "scale.yaml",
            "model.name=configs/models/tiny.yaml",
            f"output_dir={out}",
            "train.max_steps=3",
            "--ds-comms-logger",
            "--headroom-gb=0",
        ],
        timeout=300,
    )
    result = json.loads((out / "scale.json").read_text())
    p, m = result["prediction"], result["measured"]
    world = result["world_size"]

    # Sharding is real: built under zero.Init, each rank holds about 1/world of every parameter.
    assert world == 2
    assert m["model_param_bytes"] == p["model_bytes"]
    assert m["rank_param_bytes"] == [p["shard_bytes_per_rank"]] * world
    for fraction in m["rank_param_fraction"]:
        assert abs(fraction - 1 / world) < 0.01

    # Training ran: every step has a finite loss and a step time.
    assert len(m["step_time_s"]) == 3 and all(math.isfinite(x) for x in m["loss"])

    # Bytes per step: after the first steps (while DeepSpeed records its trace) a distill step
    # all-gathers the model three times (teacher fwd, student fwd, student bwd; embedding tied here).
    last = m["rank_comm_bytes_per_step"][0][-1]
    assert abs(last["all_gather_into_tensor"] / p["distill_allgather_bytes_per_step"] - 1) < 0.02
    assert last["reduce_scatter_tensor"] == p["distill_reduce_scatter_bytes_per_step"]  # only the gist grads
    # Cross-check with DeepSpeed's comms logger: it logs each all-gather at its input (shard) size.
    for ours, theirs in zip(m["rank_comm_bytes_per_step"][0], m["rank_ds_comms_logger_bytes_per_step"][0]):
        assert ours["all_gather_into_tensor"] == world * theirs["all_gather_into_tensor"]
        assert ours["reduce_scatter_tensor"] == theirs["reduce_scatter_tensor"]

    # RSS was sampled from outside for every rank, and each rank's own peak was recorded.
    assert len(m["sampled_peak_rss_gb"]) == world and min(m["sampled_peak_rss_gb"]) > 0
    assert len(m["rank_peak_rss_gb_at_exit"]) == world
