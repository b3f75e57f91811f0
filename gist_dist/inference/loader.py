"""Load a trained run for inference and answer with the decoder of its model family.

A run is either a fine-tuned RUN/final/ (the whole model, with `gist_model.json` naming its gist tokens
and mask) or a distill artifact (RUN/gist.safetensors + gist_config.json) applied to its base model.

    run = load_run("runs/tiny")
    answers, cache = run.answer(prompts, tails, max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .. import artifact, zero
from ..config import ModelConfig
from ..model import load_model, load_tokenizer, model_family
from ..tokens import GistEmbedding, GistKV, GistLayerOffsets, add_gist_tokens
from .causal import greedy
from .seq2seq import greedy_seq2seq

# family (model.model_family) -> its batched greedy decoder: (answers, cache with nbytes / full_prompt_nbytes)
DECODERS = {"causal": greedy, "seq2seq": greedy_seq2seq}


@dataclass
class RunModel:
    """A trained run ready for inference: fine-tuned final/ or the base model + a distill artifact."""

    model: torch.nn.Module
    tok: object
    gist_ids: list[int]
    mask: str  # the mask the run was trained with: decides which cache entries are kept
    embed: object = None  # distill: splices the trained gist rows in
    source: str = ""
    meta: dict = dataclasses.field(default_factory=dict)
    gist: torch.Tensor | None = None  # distill: the trained [k, hidden] rows
    template: str | None = None  # data.template the run trained with (None: not recorded, alpaca)
    family: str = "causal"  # model.model_family: picks the decoder in DECODERS
    prefix: int = 0  # leading template tokens the run kept visible (mask_prefix=visible); 0: hidden

    def answer(self, prompts: list[list[int]], tails: list[list[int]], max_new_tokens: int, synced_gpus: bool = False):
        """Batched greedy answers by this run's family and mask: (answers, cache with nbytes / full_prompt_nbytes)."""
        return DECODERS[self.family](
            self.model,
            prompts,
            tails,
            self.gist_ids,
            self.mask,
            max_new_tokens,
            self.tok.eos_token_id,
            self.tok.pad_token_id,
            embed=self.embed,
            synced_gpus=synced_gpus,
            prefix=self.prefix,
        )


def load_inference_model(model_cfg: ModelConfig, ds_config: dict | None = None, vocab_min: int = 0):
    """from_pretrained onto the local GPU (or CPU), or partitioned over ranks with ZeRO-3 when a
    stage-3 DeepSpeed config is given (no rank holds the whole model)."""
    with zero.build_context(ds_config):
        model = load_model(model_cfg, vocab_min=vocab_min).eval()
        if ds_config:
            import deepspeed

            model = deepspeed.initialize(model=model, config=ds_config)[0].module.eval()
    return model


def run_template(run_dir: Path, meta: dict) -> str | None:
    """The template a run trained with: its artifact's meta, else its config.yaml, else None (not recorded)."""
    if "template" in meta:
        return meta["template"]
    saved = run_dir / "config.yaml"
    if saved.is_file():
        return ((yaml.safe_load(saved.read_text()) or {}).get("data") or {}).get("template")
    return None


def load_run(run_dir, model_cfg: ModelConfig | None = None, ds_config: dict | None = None) -> RunModel:
    """The run's model: RUN/final/ (fine-tune) or the base model + RUN/gist.safetensors (distill).
    `model_cfg` sets dtype / attention, and for artifacts may name another copy of the base model."""
    from transformers import AutoTokenizer

    out, model_cfg = Path(run_dir), model_cfg or ModelConfig(name="")
    final = out / "final"
    if (final / artifact.FINAL_META).is_file():
        meta = json.loads((final / artifact.FINAL_META).read_text())
        tok = AutoTokenizer.from_pretrained(final)
        cfg = dataclasses.replace(model_cfg, name=str(final), tokenizer="")
        model = load_inference_model(cfg, ds_config)  # load_model picks the seq2seq class from the saved config
        return RunModel(
            model,
            tok,
            tok.convert_tokens_to_ids(meta["gist_tokens"]),
            meta["mask"],
            source=str(final),
            meta=meta,
            template=run_template(out, meta),
            family=model_family(model.config),
            prefix=meta.get("mask_prefix_tokens", 0),
        )
    if not (out / artifact.WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{out}: no trained model here (neither final/ nor {artifact.WEIGHTS}); train into it first"
        )
    meta = artifact.load(out)[1]
    cfg = dataclasses.replace(
        model_cfg, name=model_cfg.name or meta["base_model"], tokenizer=model_cfg.tokenizer or meta.get("tokenizer", "")
    )
    tok = load_tokenizer(cfg)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, meta["num_gist"])
    model = load_inference_model(cfg, ds_config, vocab_min=num_old)
    embedding = model.get_input_embeddings()
    with zero.gather([embedding.weight]):  # the fingerprint check reads the whole embedding
        gist, meta = artifact.load(out, expected_fingerprint=artifact.BaseModel(model.config, embedding.weight))
    like = dict(device=embedding.weight.device, dtype=embedding.weight.dtype)
    extra = {name: t.to(**like) for name, t in artifact.load_extra(out).items()}
    # hooked onto the decoder's layers: every forward of this model with gist rows applies them
    offsets = GistLayerOffsets(model.get_decoder(), extra["layer_offsets"]) if "layer_offsets" in extra else None
    kv = GistKV(model.get_decoder(), extra["kv"][:, 0], extra["kv"][:, 1]) if "kv" in extra else None
    rows = GistEmbedding(gist_ids, gist.to(**like), offsets, kv).eval()
    return RunModel(
        model,
        tok,
        gist_ids,
        "gist",
        embed=lambda ids: rows(ids, embedding),
        source=f"{cfg.name} + {out / artifact.WEIGHTS}",
        meta=meta,
        gist=rows.gist.detach(),
        template=run_template(out, meta),
        family=model_family(model.config),
        prefix=meta.get("mask_prefix_tokens", 0),
    )
