"""The distill artifact: `gist.safetensors` + `gist_config.json`. What the safetensors file holds follows
distill.params (recorded as `params` in the JSON): `gist` (k x hidden) always; with offsets also
`layer_offsets` ((layers - 1) x k x hidden); with kv also `kv` (layers x 2 x k x kv_dim: each layer's
k_proj / v_proj output at the gist positions, before RoPE), and then `gist_kv.safetensors` beside it holds
the cache those entries make (inference.causal.GistKVCache's format), for serving without our hooks.

Loading checks the base model's fingerprint, so gist embeddings are never used with a model
they were not trained for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import replace_file

WEIGHTS, CONFIG, CACHE = "gist.safetensors", "gist_config.json", "gist_kv.safetensors"
EXTRA = {"embeddings": (), "offsets": ("layer_offsets",), "kv": ("kv",)}  # distill.params -> tensors beside `gist`
FINAL_META = "gist_model.json"  # a fine-tuned run's final/: which gist tokens and mask


class ArtifactError(ValueError):
    pass


FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    # T5 names its sizes otherwise (absent from LLaMA configs: their hashes are unchanged)
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
)
SAMPLE_ROWS, SAMPLE_COLS = 32, 8  # embedding entries recorded to recognise the base model


def model_fingerprint(model_config, embedding: torch.Tensor) -> str:
    """`v2:<sha256 of the architecture config>:<sampled embedding entries>`, the same whatever dtype the
    base is loaded in: the entries are compared with bf16-sized tolerance (`fingerprints_match`), not
    hashed, since fp32, bf16 and fp16 copies of one model differ in their low bits."""
    keep = {k: v for k, v in sorted(model_config.to_dict().items()) if k in FINGERPRINT_KEYS}
    config_sha = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
    w = embedding.detach()
    rows = torch.linspace(0, w.shape[0] - 1, SAMPLE_ROWS).long().to(w.device)
    cols = torch.linspace(0, w.shape[1] - 1, SAMPLE_COLS).long().to(w.device)
    sample = w[rows][:, cols].float().flatten().cpu().tolist()
    return f"v2:{config_sha}:" + ",".join(f"{v:.6g}" for v in sample)


def fingerprints_match(saved: str | None, current: str) -> bool:
    """Same config hash and every sampled entry equal within 2^-7 relative (bf16's rounding, with margin)."""
    if not saved or not saved.startswith("v2:"):
        return False
    (_, sha_a, vals_a), (_, sha_b, vals_b) = saved.split(":", 2), current.split(":", 2)
    a = torch.tensor([float(v) for v in vals_a.split(",")])
    b = torch.tensor([float(v) for v in vals_b.split(",")])
    if sha_a != sha_b or a.shape != b.shape:
        return False
    scale = float(a.pow(2).mean().sqrt()) + 1e-12
    return bool(((a - b).abs() <= 2**-7 * a.abs() + 1e-3 * scale).all())


class BaseModel:
    """The base model an artifact is loaded onto, as far as the fingerprint check needs it."""

    def __init__(self, model_config, embedding: torch.Tensor):
        self.config, self.embedding = model_config, embedding
        self.fingerprint = model_fingerprint(model_config, embedding)

    def matches(self, saved: str | None) -> bool:
        return fingerprints_match(saved, self.fingerprint)


def save(directory: str | Path, gist: torch.Tensor, meta: dict, **extra: torch.Tensor | None):
    """Write both files atomically (temp names, then rename). `extra`: layer_offsets= or kv= (None: absent)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = d / (WEIGHTS + ".tmp"), d / (CONFIG + ".tmp")
    tensors = {"gist": gist, **{name: t for name, t in extra.items() if t is not None}}
    params = next((p for p, names in EXTRA.items() if set(names) == set(tensors) - {"gist"}), None)
    if params is None:
        raise ValueError(f"an artifact holds gist with nothing, layer_offsets or kv beside it, not {sorted(tensors)}")
    save_file({name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}, str(tmp_w))
    meta = {**meta, "params": params}
    tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=True))
    replace_file(tmp_w, d / WEIGHTS)
    replace_file(tmp_c, d / CONFIG)


def load(directory: str | Path, expected_fingerprint: str | BaseModel | None = None) -> tuple[torch.Tensor, dict]:
    d = Path(directory)
    if not (d / WEIGHTS).is_file() or not (d / CONFIG).is_file():
        raise ArtifactError(f"{d}: not a gist artifact (needs {WEIGHTS} and {CONFIG})")
    try:
        meta = json.loads((d / CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{d / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{d / CONFIG}: expected a JSON object")
    if expected_fingerprint is not None:
        base = expected_fingerprint
        ok = (
            base.matches(meta.get("base_fingerprint"))
            if isinstance(base, BaseModel)
            else meta.get("base_fingerprint") == base
        )
        if not ok:
            current = base.fingerprint if isinstance(base, BaseModel) else base
            raise ArtifactError(
                f"{d}: gist embeddings were trained for base model {meta.get('base_model')!r} "
                f"(fingerprint {str(meta.get('base_fingerprint'))[:12]}), not this one "
                f"(fingerprint {current[:12]})"
            )
    try:  # safetensors only: a file of any other format (a pickle too) is refused, never run
        tensors = load_file(str(d / WEIGHTS))
        gist = tensors["gist"]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(
            f"{d / WEIGHTS}: not a safetensors file with a 'gist' tensor "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if gist.shape[0] != meta.get("num_gist"):
        raise ArtifactError(f"{d}: {WEIGHTS} holds {gist.shape[0]} rows but config says {meta.get('num_gist')}")
    params, extra = meta.get("params", "embeddings"), sorted(set(tensors) - {"gist"})
    offsets, kv = tensors.get("layer_offsets"), tensors.get("kv")
    if (
        params not in EXTRA
        or extra != sorted(EXTRA[params])
        or (offsets is not None and (offsets.dim() != 3 or offsets.shape[1:] != gist.shape))
        or (kv is not None and (kv.dim() != 4 or kv.shape[1] != 2 or kv.shape[2] != gist.shape[0]))
    ):
        shapes = {name: list(tensors[name].shape) for name in sorted(tensors)}
        raise ArtifactError(f"{d}: {WEIGHTS} holds {shapes}, which does not match its config (params={params})")
    return gist, meta


def load_extra(directory: str | Path) -> dict[str, torch.Tensor]:
    """The artifact's tensors beside `gist` (layer_offsets or kv; none for embeddings; check it with `load` first)."""
    return {name: t for name, t in load_file(str(Path(directory) / WEIGHTS)).items() if name != "gist"}
