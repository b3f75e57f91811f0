"""The distill artifact: `gist.safetensors` (k x hidden) + `gist_config.json`.

Loading checks the base model's fingerprint, so gist embeddings are never used with a model
they were not trained for.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG = "gist.safetensors", "gist_config.json"


class ArtifactError(ValueError):
    pass


def model_fingerprint(model_config, embedding: torch.Tensor) -> str:
    """sha256 of the architecture config and the (gathered) input embedding matrix."""
    h = hashlib.sha256()
    keep = {k: v for k, v in sorted(model_config.to_dict().items())
            if k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "vocab_size", "rope_theta")}
    h.update(json.dumps(keep, sort_keys=True).encode())
    h.update(embedding.detach().float().contiguous().cpu().numpy())  # hashed in place: no copy of a GB-sized matrix
    return h.hexdigest()


def save(directory: str | Path, gist: torch.Tensor, meta: dict):
    """Write both files atomically (temp names, then rename)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = d / (WEIGHTS + ".tmp"), d / (CONFIG + ".tmp")
    save_file({"gist": gist.detach().float().contiguous().cpu()}, str(tmp_w))
    tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_w, d / WEIGHTS)
    os.replace(tmp_c, d / CONFIG)


def load(directory: str | Path, expected_fingerprint: str | None = None) -> tuple[torch.Tensor, dict]:
    d = Path(directory)
    if not (d / WEIGHTS).is_file() or not (d / CONFIG).is_file():
        raise ArtifactError(f"{d}: not a gist artifact (needs {WEIGHTS} and {CONFIG})")
    try:
        meta = json.loads((d / CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{d / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{d / CONFIG}: expected a JSON object")
    if expected_fingerprint is not None and meta.get("base_fingerprint") != expected_fingerprint:
        raise ArtifactError(f"{d}: gist embeddings were trained for base model {meta.get('base_model')!r} "
                            f"(fingerprint {str(meta.get('base_fingerprint'))[:12]}), not this one "
                            f"(fingerprint {expected_fingerprint[:12]})")
    try:  # safetensors only: a file of any other format (a pickle too) is refused, never run
        gist = load_file(str(d / WEIGHTS))["gist"]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(f"{d / WEIGHTS}: not a safetensors file with a 'gist' tensor "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if gist.shape[0] != meta.get("num_gist"):
        raise ArtifactError(f"{d}: {WEIGHTS} holds {gist.shape[0]} rows but config says {meta.get('num_gist')}")
    return gist, meta
