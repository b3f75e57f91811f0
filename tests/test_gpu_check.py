"""benchmarks/gpu_check.sh --dry-run: the GPU check's own code path on CPU (tiny shape, fp32, 2 steps)."""

from __future__ import annotations

import json
import math
import sys

from conftest import ROOT, run

VARIANTS = ("gist", "gist_ckpt", "distill", "compress", "packed_dense")


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    run([ROOT / "benchmarks" / "gpu_check.sh", "--dry-run", out], timeout=600, env={"PYTHON": sys.executable})
    result = json.loads((out / "gpu_check.json").read_text())
    steps = result["steps"]
    assert result["ok"] and result["dry_run"] and result["device"] == "cpu"
    assert set(steps) == {"tests", *VARIANTS, "eval", "packed_flex"} and all(s["ok"] for s in steps.values())
    assert steps["packed_flex"]["skipped"] == "FlexAttention trains only on CUDA" and "flex_vs_dense" not in result
    assert "data.packing=true" in steps["packed_dense"]["overrides"]
    assert math.isfinite(result["peak_tflops"]) and result["peak_tflops"] > 0
    for name in VARIANTS:
        s = steps[name]
        assert s["steps"] == 2 and all(math.isfinite(s[k]) and s[k] > 0 for k in ("tokens_per_s", "peak_mem_gb", "mfu"))
    assert steps["gist_ckpt"]["overrides"] == ["train.activation_checkpointing=true"]
    assert steps["eval"]["cached_equals_uncached"] is True and steps["eval"]["n"] == 3 and any(steps["eval"]["cached"])
    log = (out / "gpu_check.log").read_text()
    assert "tokens/s" in log and "peak GB" in log and "ok=True" in log
