"""Everything ZeRO: the DeepSpeed config, building a model already partitioned, gathering
partitioned parameters, and the consolidated weights for export.

    ds = deepspeed_config(cfg, hidden_size_of(cfg), dtype)   # "auto" values filled per run
    with build_context(ds):                                  # from_pretrained runs inside zero.Init
        model = load_model(cfg.model)
    with gather([w]):                                        # whole (and writable on rank 0) if partitioned
        ...

Bucket sizes follow HF Trainer's "auto" rule (reduce bucket = hidden^2, prefetch = 0.9 hidden^2,
persistence threshold = 10 hidden): DeepSpeed's fixed defaults (5e8 elements) dominate memory at
small sizes and made a 135M model use more memory under ZeRO-3 than without it.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

from .config import ConfigError, RunConfig
from .model import ROOT, config_from_shape, is_shape_file, resolve_model_path

# Blocks of an HF-style DeepSpeed JSON that the run config owns: gist-dist builds the optimizer
# (AdamW over what the method trains) and the warm-up/cosine schedule from train.*.
OWNED_BLOCKS = {"optimizer": "train.lr / train.weight_decay", "scheduler": "train.warmup_steps / train.min_lr_ratio"}


def _fill(node, values: dict, path: str = ""):
    """Replace "auto" by the value for its dotted path (or, failing that, its key); one line per unknown key."""
    for key, value in list(node.items()):
        full = f"{path}{key}"
        if isinstance(value, dict):
            _fill(value, values, f"{full}.")
        elif value == "auto":
            if full not in values and key not in values:
                raise ConfigError(f"DeepSpeed config: no rule to fill 'auto' for {full!r}; give it a value")
            node[key] = values.get(full, values.get(key))


def deepspeed_config(cfg: RunConfig, hidden_size: int, dtype: torch.dtype) -> dict:
    path = Path(cfg.zero.json)
    if not path.is_absolute() and not path.exists():
        path = ROOT / cfg.zero.json
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"zero.json: DeepSpeed config not found: {cfg.zero.json}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"zero.json: {cfg.zero.json} is not valid JSON ({e.msg}, line {e.lineno})") from None
    ds = copy.deepcopy(ds)
    for block, owner in OWNED_BLOCKS.items():
        if block in ds:
            raise ConfigError(
                f"zero.json: {cfg.zero.json} has an {block!r} block; gist-dist sets the {block} from "
                f"{owner}: remove the block"
            )
    zero = ds.setdefault("zero_optimization", {})
    if "stage" in zero and zero["stage"] != "auto" and zero["stage"] != cfg.zero.stage:
        raise ConfigError(f"zero.stage={cfg.zero.stage} but {cfg.zero.json} says stage {zero['stage']}")
    zero["stage"] = cfg.zero.stage
    if cfg.zero.stage < 3:  # stage-3-only keys confuse lower stages
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
    h2 = hidden_size * hidden_size
    persistence = cfg.zero.persistence_threshold if cfg.zero.persistence_threshold >= 0 else 10 * hidden_size
    _fill(
        ds,
        {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.train.grad_clip,
            "bf16.enabled": dtype == torch.bfloat16,
            "fp16.enabled": dtype == torch.float16,
            "train_batch_size": "derived",  # popped below: DeepSpeed derives it
            "zero_optimization.stage3_gather_16bit_weights_on_model_save": True,
            "reduce_bucket_size": h2,
            "stage3_prefetch_bucket_size": int(0.9 * h2),
            "stage3_param_persistence_threshold": persistence,
        },
    )
    if cfg.zero.persistence_threshold >= 0 and cfg.zero.stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero.persistence_threshold
    if dtype == torch.float16:  # dynamic loss scaling (loss_scale 0) unless the JSON sets its own
        ds["fp16"] = {"loss_scale": 0, **ds.get("fp16", {}), "enabled": True}
        ds.pop("bf16", None)
    elif dtype == torch.bfloat16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
        ds.pop("fp16", None)
    else:
        for half in ("bf16", "fp16"):
            ds.pop(half, None)
    for kind in ("param", "optimizer"):
        device = getattr(cfg.zero, f"offload_{kind}")
        if device != "none":
            # keep the JSON's own offload settings (nvme buffer sizes); the run config picks the device
            zero[f"offload_{kind}"] = {
                **zero.get(f"offload_{kind}", {}),
                "device": device,
                "pin_memory": torch.cuda.is_available(),
            }
            if device == "nvme":
                zero[f"offload_{kind}"]["nvme_path"] = cfg.zero.nvme_path
    if cfg.zero.offload_optimizer != "none":
        # The client optimizer (torch AdamW) steps on the offloaded fp32 master weights on the host;
        # DeepSpeed otherwise insists on its own CPU Adam, a C++ op compiled on first use.
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accum x world
    return ds


def build_nvme_op(cfg: RunConfig, say=print) -> None:
    """NVMe offload runs on DeepSpeed's async_io C++ op, compiled the first time it is used: minutes on
    a small CPU, with nothing printed, so a run looks hung. Build it before the engine, saying so. An
    interrupted build leaves torch's lock file behind, and every later run waits on it for ever: name it."""
    if "nvme" not in (cfg.zero.offload_param, cfg.zero.offload_optimizer):
        return
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from torch.utils.cpp_extension import _get_build_directory

    builder = AsyncIOBuilder()
    if installed_ops.get(builder.name):
        return  # built into this DeepSpeed install (DS_BUILD_AIO=1)
    if not builder.is_compatible(verbose=False):
        raise ConfigError(
            "zero offload to nvme needs DeepSpeed's async_io op, which cannot be built here: "
            "install libaio and its headers (apt install libaio-dev) or offload to cpu"
        )
    folder = Path(_get_build_directory(builder.name, verbose=False))
    if not (folder / f"{builder.name}.so").exists():
        lock = folder / "lock"
        left = (
            f"; if no compiler is running, {lock} is left from an interrupted build: delete it" if lock.exists() else ""
        )
        say(
            f"gist-dist: building DeepSpeed's async_io op for nvme offload in {folder} "
            f"(first use only, minutes on a small CPU){left}"
        )
    builder.load(verbose=False)


def hidden_size_of(cfg: RunConfig) -> int:
    path = resolve_model_path(cfg.model.name)
    if is_shape_file(path):
        return int(config_from_shape(path).hidden_size)  # T5Config maps hidden_size to d_model
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path).hidden_size)


@contextlib.contextmanager
def build_context(ds_config: dict | None):
    """While alive, transformers builds models inside deepspeed.zero.Init for a stage-3 config
    (no rank ever holds the whole model); a no-op for other stages or None."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive


def is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gather(params, read_only: bool = False):
    """Make partitioned (ZeRO-3) params whole for the block, writable on rank 0 (its values broadcast on
    exit), or `read_only` (nothing broadcast); a no-op otherwise."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None if read_only else 0):
        yield


def param_bytes(model) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model): under ZeRO-3 a rank holds
    only its shard `ds_tensor`; the ratio proves the sharding is real."""
    held = sum(
        ((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) + p.data.numel()) * p.element_size()
        for p in model.parameters()
    )  # p.data is empty unless gathered or persistent
    whole = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    return held, whole


def consolidated_state_dict(engine, prefix: str = "") -> dict:
    """The whole model's weights (16-bit under ZeRO-3, gathered on rank 0 only; empty elsewhere),
    keys under `prefix` (the method's wrapper attribute) with the prefix removed."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    return {k[len(prefix) :]: v for k, v in (state or {}).items() if k.startswith(prefix)}
