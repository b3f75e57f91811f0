"""HF-style DeepSpeed JSON ("auto" everywhere) and optimizer offload."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, torchrun
from gist_dist.config import ConfigError, load_config
from gist_dist.zero import deepspeed_config

HF_STYLE = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "fp16": {"enabled": "auto", "loss_scale": 0},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": "auto",
    },
}


def _config(tmp_path, ds: dict, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return load_config(TINY, [f"zero.json={path}", *overrides])


@pytest.mark.parametrize("dtype,on,off", [(torch.bfloat16, "bf16", "fp16"), (torch.float16, "fp16", "bf16")])
def test_hf_style_auto_json_fills_each_half_precision_block_for_its_own_dtype(tmp_path, dtype, on, off):
    ds = deepspeed_config(_config(tmp_path, HF_STYLE), 64, dtype)
    assert ds[on]["enabled"] is True and off not in ds
    assert "train_batch_size" not in ds and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if dtype == torch.float16:
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize(
    "cuda, bf16, expected", [(False, False, torch.float32), (True, True, torch.bfloat16), (True, False, torch.float16)]
)
def test_auto_dtype_is_bf16_where_the_gpu_has_it_else_fp16_with_dynamic_loss_scaling(
    monkeypatch, tmp_path, cuda, bf16, expected
):
    """dtype=auto as a V100 / T4 (no bf16) or an A100+ would see it (CUDA's answers stood in for: none here),
    and the DeepSpeed block that dtype turns on: fp16 with dynamic loss scaling (loss_scale 0)."""
    from gist_dist.model import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    dtype = resolve_dtype("auto")
    assert dtype == expected
    ds = deepspeed_config(load_config(TINY), 64, dtype)
    if dtype == torch.float16:
        assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds
    elif dtype == torch.bfloat16:
        assert ds["bf16"]["enabled"] is True and "fp16" not in ds


def test_fp32_run_turns_both_half_precision_blocks_off(tmp_path):
    ds = deepspeed_config(_config(tmp_path, HF_STYLE), 64, torch.float32)
    assert "fp16" not in ds and "bf16" not in ds


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_blocks_are_refused_with_one_line(tmp_path, block):
    with pytest.raises(ConfigError, match=f"has an '{block}' block; gist-dist sets the {block} from train"):
        deepspeed_config(
            _config(tmp_path, {**HF_STYLE, block: {"type": "AdamW", "params": {"lr": "auto"}}}), 64, torch.float32
        )


def test_unknown_auto_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"no rule to fill 'auto' for 'zero_optimization.sub_group_size'"):
        deepspeed_config(
            _config(
                tmp_path, {**HF_STYLE, "zero_optimization": {**HF_STYLE["zero_optimization"], "sub_group_size": "auto"}}
            ),
            64,
            torch.float32,
        )


def test_offload_optimizer_values_are_validated():
    with pytest.raises(ConfigError, match="zero.offload_optimizer must be one of none, cpu, nvme, got .gpu."):
        load_config(TINY, ["zero.offload_optimizer=gpu"])


def _steps(out) -> dict:
    return {
        r["step"]: (r["loss"], r["grad_norm"])
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "step" in r
    }


def _optimizer_tensors(path) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    tensors = {f"fp32_{i}": t for i, t in enumerate(saved["fp32_flat_groups"])}
    for i, state in saved["optimizer_state_dict"]["state"].items():
        tensors.update({f"{name}_{i}": t for name, t in state.items()})
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("offload,objective", [("cpu", "finetune"), ("nvme", "finetune"), ("nvme", "distill")])
def test_offload_optimizer_trains_two_ranks_and_resumes_exactly(tmp_path, offload, objective):
    """Stopped at step 2 and resumed to 4, an offloaded optimizer gives the uninterrupted run's losses,
    grad norms and final optimizer state bit for bit. The first update after the resume takes its lr
    from this run's schedule (the stopped run, with max_steps=2, had saved its own); with nvme the
    saved fp32 partitions and Adam state are written back over what DeepSpeed's load leaves in use
    (distill: its one sub-group, the gist rows, is too small to swap and lost its weights too). nvme
    also refuses, in one line, to resume at another world size, which DeepSpeed cannot load."""
    common = [
        "train.lr=0.01",
        "data.num_train=64",
        f"zero.offload_optimizer={offload}",
        "train.warmup_steps=1",
        f"objective={objective}",
    ]
    if offload == "nvme":
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            pytest.skip("no libaio: nvme offload cannot run here (`make test`'s bootstrap installs libaio-dev)")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    swap = [f"zero.nvme_path={tmp_path / 'swap-straight'}"] if offload == "nvme" else []
    torchrun(["train", TINY, f"output_dir={straight}", "train.max_steps=4", *common, *swap])
    swap = [f"zero.nvme_path={tmp_path / 'swap-resumed'}"] if offload == "nvme" else []
    torchrun(["train", TINY, f"output_dir={resumed}", "train.max_steps=2", *common, *swap])
    proc = torchrun(["train", TINY, f"output_dir={resumed}", "train.max_steps=4", *common, *swap])
    assert "resumed from" in proc.stderr + proc.stdout
    full, parts = _steps(straight), _steps(resumed)
    assert list(parts) == [1, 2, 3, 4] and parts == full
    assert full[4][0] < full[1][0]
    for rank in (0, 1):  # and the optimizer ends in the same state: master weights, moments, step counts
        a, b = (
            _optimizer_tensors(out / "checkpoints" / "step00000004" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            for out in (straight, resumed)
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if offload == "nvme" and objective == "finetune":
        proc = torchrun(
            ["train", TINY, f"output_dir={resumed}", "train.max_steps=6", *common, *swap], nproc=1, check=False
        )
        ours = [line for line in proc.stderr.splitlines() if line.startswith("gist-dist: error:")]
        assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
        assert "saved by 2 ranks, resuming with 1" in ours[0] and "zero.offload_optimizer=cpu" in ours[0]
        assert _steps(resumed) == parts  # nothing trained, nothing logged


def test_nvme_offload_builds_its_op_first_and_names_a_stale_lock(tmp_path, monkeypatch):
    """Before the engine, nvme offload builds DeepSpeed's async_io op with a line saying so, and names
    the lock an interrupted build left (torch waits on it for ever). The compile itself (minutes here)
    is stood in for; the nvme resume test above runs the real op."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from gist_dist.zero import build_nvme_op

    loads = []
    monkeypatch.setattr(AsyncIOBuilder, "load", lambda self, verbose=False: loads.append(self.name))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    said = []
    build_nvme_op(load_config(TINY), say=said.append)  # no nvme: nothing built
    assert loads == [] and said == []
    nvme = load_config(TINY, ["zero.offload_optimizer=nvme", f"zero.nvme_path={tmp_path}"])
    build_nvme_op(nvme, say=said.append)
    assert loads == ["async_io"] and "building DeepSpeed's async_io op" in said[0] and "lock" not in said[0]
    (tmp_path / "async_io").mkdir(exist_ok=True)
    (tmp_path / "async_io" / "lock").write_text("")
    build_nvme_op(nvme, say=said.append)
    assert str(tmp_path / "async_io" / "lock") in said[1] and "interrupted build" in said[1]
    (tmp_path / "async_io" / "async_io.so").write_text("")
    build_nvme_op(nvme, say=said.append)
    assert len(said) == 2  # built: nothing to say
