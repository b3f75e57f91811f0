"""GPU-only tests (marked `gpu`): skipped where CUDA is absent, as in CI; benchmarks/gpu_check.sh runs
them on a lent GPU. Like the check they use only the CLI and the files a run writes: these tests never
run in CI, so an internal rename would break them unseen."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch

from conftest import BIN, ROOT, TINY, gist_dist, torchrun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here; CI has none)"),
]
INSTRUCTION = "Repeat the words of the input in reverse order."
# On the lent GPU the embedded SmolLM2 is absent: benchmarks/gpu_check.sh points this at the carried tokenizer.
TOKENIZER = f"model.tokenizer={os.environ.get('GPU_CHECK_TOKENIZER') or 'smollm2'}"


def steps_of(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r and "loss" in r]


def test_train_on_cuda_with_auto_dtype_picks_half_precision(tmp_path):
    """A 1-rank ZeRO-3 train of the tiny shape: batches reach the GPU (a CPU batch would fail the first
    forward with a device mismatch), dtype=auto is bf16 (fp16 where the GPU has none), memory is the GPU's."""
    out = tmp_path / "run"
    torchrun(["train", TINY, TOKENIZER, f"output_dir={out}", "model.dtype=auto", "train.max_steps=3"], nproc=1)
    steps = steps_of(out)
    assert len(steps) == 3 and all(math.isfinite(s["loss"]) for s in steps)
    saved = json.loads((out / "final" / "config.json").read_text())
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert saved.get("dtype", saved.get("torch_dtype")) == expected
    assert 0 < steps[-1]["peak_mem_gb"] < 1.5  # max_memory_allocated of a 3M-parameter model, not host RSS


def test_eval_cache_equals_uncached_on_cuda_and_any_local_rank(tmp_path):
    """Distill run; `eval` (gist KV cache, replicated and ZeRO-3) == `generate` (uncached loop under the gist
    mask), answer for answer. A stale LOCAL_RANK past the last GPU picks LOCAL_RANK % device_count."""
    run = tmp_path / "distill"
    torchrun(["train", TINY, TOKENIZER, "objective=distill", f"output_dir={run}", "train.max_steps=2"], nproc=1)
    inputs = ["apple river stone", "cloud piano tiger lemon", "candle forest", "silver window rocket garden"]
    split = tmp_path / "check.jsonl"
    split.write_text("".join(json.dumps({"instruction": INSTRUCTION, "input": x, "output": x}) + "\n" for x in inputs))
    args = [
        "eval",
        TINY,
        TOKENIZER,
        "objective=distill",
        f"output_dir={run}",
        f"data.eval_splits=check:{split}",
        "eval_max_new_tokens=8",
    ]
    stale = {"LOCAL_RANK": str(torch.cuda.device_count())}
    gist_dist(args, env=stale)
    replicated = [json.loads(x)["prediction"] for x in (run / "eval_outputs.jsonl").read_text().splitlines()]
    torchrun(args + ["--zero3"], nproc=1)
    zero3 = [json.loads(x)["prediction"] for x in (run / "eval_outputs.jsonl").read_text().splitlines()]
    uncached = subprocess.run(
        [str(BIN / "gist-dist"), "generate", "--gist", str(run), "--instruction", INSTRUCTION, "--max-new-tokens", "8"],
        input="".join(x + "\n" for x in inputs),
        cwd=ROOT,
        env={**os.environ, **stale},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert len(replicated) == len(inputs) and any(replicated)
    assert zero3 == replicated
    assert "".join(a + "\n" for a in replicated) == uncached
