"""DeepSpeed set-up: fill the "auto" values of a ZeRO JSON from the run config and the model shape.

Bucket sizes follow HF Trainer's "auto" rule (reduce bucket = hidden^2, prefetch = 0.9 hidden^2,
persistence threshold = 10 hidden): DeepSpeed's fixed defaults (5e8 elements) dominate memory at
small sizes and made a 135M model use more memory under ZeRO-3 than without it.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from .config import ConfigError, RunConfig
from .model import ROOT


def _fill(node, values: dict):
    for key, value in list(node.items()):
        if isinstance(value, dict):
            _fill(value, values)
        elif value == "auto":
            if key not in values:
                raise ConfigError(f"DeepSpeed config: no rule to fill 'auto' for {key!r}")
            node[key] = values[key]


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
    zero = ds.setdefault("zero_optimization", {})
    if "stage" in zero and zero["stage"] != "auto" and zero["stage"] != cfg.zero.stage:
        raise ConfigError(f"zero.stage={cfg.zero.stage} but {cfg.zero.json} says stage {zero['stage']}")
    zero["stage"] = cfg.zero.stage
    if cfg.zero.stage < 3:  # stage-3-only keys confuse lower stages
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
    h2 = hidden_size * hidden_size
    persistence = cfg.zero.persistence_threshold if cfg.zero.persistence_threshold >= 0 else 10 * hidden_size
    _fill(ds, {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "enabled": dtype == torch.bfloat16,
        "reduce_bucket_size": h2,
        "stage3_prefetch_bucket_size": int(0.9 * h2),
        "stage3_param_persistence_threshold": persistence,
    })
    if cfg.zero.persistence_threshold >= 0 and cfg.zero.stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero.persistence_threshold
    if dtype == torch.float16:
        ds["fp16"] = {"enabled": True}
    for kind in ("param", "optimizer"):
        device = getattr(cfg.zero, f"offload_{kind}")
        if device != "none":
            # keep the JSON's own offload settings (nvme buffer sizes); the run config picks the device
            zero[f"offload_{kind}"] = {**zero.get(f"offload_{kind}", {}), "device": device,
                                       "pin_memory": torch.cuda.is_available()}
            if device == "nvme":
                zero[f"offload_{kind}"]["nvme_path"] = cfg.zero.nvme_path
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accum x world
    return ds


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to min_ratio."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
