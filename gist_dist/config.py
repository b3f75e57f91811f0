"""Typed run configuration: YAML file + `key=value` overrides (dotted for nested keys).

Unknown keys, wrong types and impossible values raise ConfigError with one clear line;
the CLI turns that into exit code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

Objective = Literal["finetune", "distill"]  # gist_dist/methods/: what trains and by which loss
Mask = Literal["gist", "pos_control", "neg_control"]  # gist_dist/masks.py: what later tokens may see
Template = Literal["alpaca", "chat", "chat_system"]  # gist_dist/data/template.py: the text around the gist
LogBackend = Literal["jsonl", "tensorboard", "wandb"]
OBJECTIVES, MASKS, TEMPLATES, LOG_BACKENDS = (typing.get_args(t) for t in (Objective, Mask, Template, LogBackend))
# The removed `mode` key, for the one line that says what to write instead
REMOVED_MODE = {
    "gist": "objective=finetune mask=gist",
    "pos_control": "objective=finetune mask=pos_control",
    "neg_control": "objective=finetune mask=neg_control",
    "distill": "objective=distill",
}


class ConfigError(ValueError):
    """A bad config: the message is one line meant for the user."""


@dataclass
class ModelConfig:
    # "smollm2" (embedded default), a local HF folder, a .gguf file, a hub id, or a
    # shape file (configs/models/*.yaml) for a randomly initialised LLaMA.
    name: str = "smollm2"
    tokenizer: str = ""  # defaults to the model's; shape files need one (e.g. "smollm2")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    attn_implementation: str = "sdpa"  # HF attention for the dense mask: sdpa or eager
    # How the gist mask reaches attention in training: dense (a 4D float mask: CPU, sdpa/eager),
    # flex (FlexAttention BlockMask: skips fully masked blocks; CUDA only, no CPU backward), auto:
    # flex on CUDA, dense elsewhere.
    attention: Literal["auto", "dense", "flex"] = "auto"
    seed: int = 0  # init seed for shape models


@dataclass
class DataConfig:
    train: str = "generated"  # "generated" or a JSON/JSONL path or a datasets name
    eval: str = "generated"  # held-out records for the eval loss during training, same forms as train
    eval_splits: dict = field(default_factory=dict)  # name -> path, for `gist-dist eval`
    columns: dict = field(default_factory=dict)  # our field -> the source's: instruction=question, output=answer
    # 0: every record of a file or dataset (nothing is cut unless asked); generated data then makes
    # GENERATED_DEFAULT records. A limit takes the first N records, and the start record says so.
    num_train: int = 0
    num_eval: int = 0
    max_length: int = 256  # tokens per example (per packed row with packing)
    overlong: Literal["truncate", "drop"] = "truncate"  # an example longer than max_length: its answer cut, or left out
    template: Template = "alpaca"  # alpaca (the paper's) | chat | chat_system (the tokenizer's chat template)
    packing: bool = False  # several examples per row of up to max_length tokens (gist_dist/data/packing.py)
    bad_records: Literal["error", "skip"] = "error"  # a malformed record stops the run, or is counted and skipped
    seed: int = 0  # generated data and the record order


@dataclass
class DistillConfig:
    temperature: float = 1.0  # of the KL (scaled by T^2)
    lm_weight: float = 0.0  # mix: (1-w) * KL + w * LM loss
    # gist_mask: the student sees the prompt and gist under the gist mask; no_prompt: only the gist (compress)
    student: Literal["gist_mask", "no_prompt"] = "gist_mask"
    cache_teacher: bool = False  # keep teacher logits per training example (fixed data, e.g. compress)
    # What trains, always for the same k cached tokens (decoder-only models beyond embeddings; docs/recipes.md):
    # embeddings: the k gist input rows (prompt tuning); offsets: also one [k, hidden] offset per decoder layer
    # after the first at the gist positions (deep prompts); kv: the gist positions' keys and values at every
    # layer, i.e. the cache itself (prefix tuning; needs student=no_prompt, a prompt-independent cache)
    params: Literal["embeddings", "offsets", "kv"] = "embeddings"


@dataclass
class TrainConfig:
    micro_batch_size: int = 4  # examples (or packed rows) per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # optimizer steps
    lr: float = 1e-4  # peak, after linear warmup; cosine down to min_lr_ratio * lr
    # objective=finetune: the gist tokens' input rows train as their own parameter at this lr (0: train.lr).
    # A new embedding row moves about lr per step under Adam, so at the backbone's lr one new token is barely
    # learnt in a short run; distill trains only those rows and uses train.lr for them.
    gist_lr: float = 0.0
    weight_decay: float = 0.0  # AdamW's
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient norm
    log_every: int = 1  # steps between progress lines (metrics.jsonl has every step)
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4  # micro-batches per rank in each eval loss
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    # Recompute each decoder layer in backward (HF gradient checkpointing, non-reentrant, so it works
    # for distill too, where the only trainable tensor sits at the input): activations drop to one
    # hidden state per layer, as `gist-dist plan --checkpointing` counts.
    activation_checkpointing: bool = False
    verify_frozen: bool = True  # distill: digest every frozen weight before and after training
    seed: int = 0  # batch order


@dataclass
class ZeroConfig:
    json: str = "configs/zero3.json"  # DeepSpeed config with "auto" values
    stage: Literal[0, 1, 2, 3] = 3  # ZeRO stage; 3 shards the parameters too
    persistence_threshold: int = -1  # -1: auto (10 * hidden)
    offload_param: Literal["none", "cpu", "nvme"] = "none"  # where ZeRO-3 keeps the parameters between uses
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"  # where the Adam state and fp32 weights live
    nvme_path: str = ""  # the folder for nvme offload (a fast local disk)


@dataclass
class LogConfig:
    backends: list[LogBackend] = field(default_factory=lambda: ["jsonl"])  # jsonl is required; wandb runs offline
    # auto: a tqdm bar on a terminal, plain lines every train.log_every steps otherwise
    progress: Literal["auto", "bar", "lines"] = "auto"


@dataclass
class RunConfig:
    # finetune: the whole model with the LM loss | distill: a frozen model, only what distill.params names, by KL
    objective: Objective = "finetune"
    mask: Mask = "gist"  # what later tokens may see (distill: the student's mask, gist)
    # visible: the template's fixed leading tokens (BOS, "Instruction:", a chat header) stay visible to
    # every query under gist and neg_control too (an attention sink that carries no prompt); masks.py
    mask_prefix: Literal["hidden", "visible"] = "hidden"
    num_gist: int = 1  # k, the gist tokens after each prompt
    output_dir: str = "runs/default"  # checkpoints, metrics, the final model; an existing one resumes
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    log: LogConfig = field(default_factory=LogConfig)
    timeout_s: int = 600  # collective timeout
    eval_max_new_tokens: int = 32  # `gist-dist eval`: greedy answer length
    eval_batch_size: int = 8  # `gist-dist eval`: prompts per batch per rank

    @property
    def run_kind(self) -> str:
        """One word for logs and records: the mask when fine-tuning, else the objective."""
        return self.mask if self.objective == "finetune" else self.objective

    def validate(self) -> RunConfig:
        checks = [
            (
                self.objective != "distill" or self.mask == "gist",
                f"objective=distill trains a student under the gist mask; mask={self.mask} is for objective=finetune",
            ),
            (1 <= self.num_gist <= 64, f"num_gist must be between 1 and 64, got {self.num_gist}"),
            (self.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
            (self.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (self.train.max_steps >= 1, "train.max_steps must be >= 1"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.gist_lr >= 0, "train.gist_lr must be >= 0 (0: train.lr)"),
            (
                not self.train.gist_lr or self.objective == "finetune",
                "train.gist_lr is for objective=finetune; distill trains only the gist rows, at train.lr",
            ),
            (self.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
            (self.train.save_every >= 0, "train.save_every must be >= 0 (0: only at the end)"),
            (self.train.eval_every >= 0, "train.eval_every must be >= 0 (0: only at the end)"),
            (self.data.max_length >= 8, "data.max_length must be >= 8"),
            (self.zero.offload_param == "none" or self.zero.stage == 3, "zero.offload_param needs zero.stage=3"),
            (self.zero.offload_param != "nvme" or self.zero.nvme_path, "zero.offload_param=nvme needs zero.nvme_path"),
            (
                self.zero.offload_optimizer == "none" or self.zero.stage >= 1,
                "zero.offload_optimizer needs zero.stage >= 1",
            ),
            (
                self.zero.offload_optimizer != "nvme" or (self.zero.nvme_path and self.zero.stage == 3),
                "zero.offload_optimizer=nvme needs zero.stage=3 and zero.nvme_path",
            ),
            (self.distill.temperature > 0, "distill.temperature must be > 0"),
            (0.0 <= self.distill.lm_weight <= 1.0, "distill.lm_weight must be in [0, 1]"),
            (
                self.distill.params == "embeddings" or not self.train.activation_checkpointing,
                f"distill.params={self.distill.params} cannot be combined with train.activation_checkpointing (the "
                "recomputed layers would miss what trains at the gist positions)",
            ),
            (self.timeout_s > 0, "timeout_s must be > 0"),
            (
                set(self.data.columns) <= {"instruction", "input", "output"},
                f"data.columns: keys must be instruction, input or output, got {sorted(self.data.columns)}",
            ),
            (
                self.data.num_train >= 0 and self.data.num_eval >= 0,
                "data.num_train and data.num_eval must be >= 0 (0: all)",
            ),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (
                "jsonl" in self.log.backends,
                "log.backends must include jsonl (metrics.jsonl is what resume and reports read)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _flow_yaml(value, key: str):
    """A command-line value in YAML's flow syntax ("[a, b]", "{k: v}") as YAML reads it; other values as they are."""
    if not (isinstance(value, str) and value.lstrip().startswith(("[", "{"))):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"{key}: not valid YAML flow syntax: {value!r}") from None


def _coerce(value, typ, key: str):
    """Check/convert one value to the declared field type (strings from the command line too)."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        for choice in choices:  # "3" from the command line is the choice 3
            if (
                value == choice
                and type(value) is type(choice)
                or isinstance(value, str)
                and not isinstance(choice, str)
                and value == str(choice)
            ):
                return choice
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    value = _flow_yaml(value, key) if typ is list or origin in (list, dict) or typ is dict else value
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is list or origin is list:
        if isinstance(value, str):  # a,b,c from the command line
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            item = (typing.get_args(typ) or (str,))[0]
            return [_coerce(v, item, key) for v in value]
    elif typ is dict or origin is dict:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        if isinstance(value, str):  # name:path,name:path
            try:
                return dict(item.split(":", 1) for item in value.split(",") if item)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _apply(obj, updates: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if full == "mode":
            hint = REMOVED_MODE.get(str(value), "objective=finetune|distill and mask=gist|pos_control|neg_control")
            raise ConfigError(f"mode={value} was removed: write {hint} instead")
        if full == "distill.layer_offsets":
            raise ConfigError("distill.layer_offsets was removed: write distill.params=offsets instead")
        if key not in names:
            raise ConfigError(f"unknown config key {full!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping, got {value!r}")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_overrides(items: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": "1"}, "c": "x"}."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return out


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    cfg = RunConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _apply(cfg, data)
    _apply(cfg, parse_overrides(overrides or []))
    return cfg.validate()


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
