"""Gist tokens: registering them, initialising their embeddings, and the gist-row splice.

Two ways to hold the gist embeddings, one per objective:
- fine-tune: the vocabulary grows by k rows (`init_gist_embeddings`), trained with the model;
- distill: the vocabulary is untouched and a separate [k, hidden] parameter (`GistEmbedding`)
  is spliced in at the gist positions, PEFT prompt-tuning style; training and inference share it.
  With distill.params=offsets it also carries one trained [k, hidden] offset per decoder layer
  (`GistLayerOffsets`), P-tuning v2 style; with distill.params=kv the gist positions' keys and values
  at every layer are the trained parameters themselves (`GistKV`, prefix tuning).
ZeRO-3 gathering is passed in as a context (`zero.gather`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def gist_token_strings(num_gist: int) -> list[str]:
    return [f"<GIST_{i}>" for i in range(num_gist)]


def add_gist_tokens(tokenizer, num_gist: int) -> list[int]:
    """Register the gist tokens as special tokens; returns their ids (in order)."""
    tokens = gist_token_strings(num_gist)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert len(set(ids)) == num_gist and tokenizer.unk_token_id not in ids
    return ids


def init_gist_embeddings(model, gist_ids: list[int], num_old: int, new_size: int, gather=contextlib.nullcontext):
    """Resize embeddings to cover gist ids and set their rows to the mean of the old rows.

    `gather(params)` makes (partitioned) params whole and writable, e.g. zero.gather under ZeRO-3.
    Never shrinks: checkpoints such as FLAN-T5 have more rows than their tokenizer (32128 vs 32100),
    and the gist ids then reuse spare rows.
    """
    w = model.get_input_embeddings().weight
    rows = getattr(w, "ds_shape", w.shape)[0]  # ZeRO-3 leaves an empty tensor and the full shape
    model.resize_token_embeddings(max(new_size, rows), mean_resizing=False)
    mats = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not mats[0]:
        mats.append(out.weight)
    with gather(mats), torch.no_grad():
        for w in mats:
            w[gist_ids] = w[:num_old].float().mean(0).to(w.dtype)


def mean_embedding(model, gather=contextlib.nullcontext) -> torch.Tensor:
    w = model.get_input_embeddings().weight
    with gather([w]):
        return w.detach().float().mean(0).to(w.dtype).clone()


class GistEmbedding(nn.Module):
    """k trainable rows that replace the embeddings of the gist ids (which must be consecutive, as
    `add_gist_tokens` makes them: the row is the id's offset from the first)."""

    def __init__(
        self, gist_ids: list[int], init: torch.Tensor, offsets: GistLayerOffsets | None = None, kv: GistKV | None = None
    ):
        super().__init__()
        self.offsets, self.kv = offsets, kv  # told where the gist tokens are in each forward
        ids = list(gist_ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"gist ids must be consecutive, got {ids}")
        if init.shape[0] != len(ids):
            raise ValueError(f"{init.shape[0]} gist rows for {len(ids)} gist ids")
        self.gist = nn.Parameter(init.clone())  # [k, hidden]
        self.register_buffer("gist_ids", torch.tensor(ids, device=init.device), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        embedding: nn.Module | None = None,
        *,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings from `embedding`, with the gist rows taken from this parameter; or, given
        `hidden` ([N, hidden]), the output side of a tied model: those rows' logits for the gist ids, [N, k].
        Both go through the module call, so ZeRO-3 gathers the parameter for either use."""
        if hidden is not None:
            return hidden @ self.gist.to(hidden.dtype).T
        is_gist = torch.isin(input_ids, self.gist_ids)
        emb = embedding(torch.where(is_gist, torch.zeros_like(input_ids), input_ids))
        index = (input_ids - self.gist_ids[0]).clamp(0, len(self.gist_ids) - 1)
        for deep in (self.offsets, self.kv):
            if deep is not None:
                deep.where = (is_gist.nonzero(as_tuple=True), index[is_gist])
        return torch.where(is_gist[..., None], self.gist[index].to(emb.dtype), emb)


class _LayerOffset(nn.Module):
    """One decoder layer's k offsets; a module of its own so that ZeRO-3 gathers it when it is called."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = nn.Parameter(rows.clone())

    def forward(self, hidden: torch.Tensor, where) -> torch.Tensor:
        positions, row = where
        return hidden.index_put(positions, self.rows[row].to(hidden.dtype), accumulate=True)


class GistLayerOffsets(nn.Module):
    """Deep gist tokens: a trained offset added to the residual stream at each gist position as it
    enters every decoder layer after the first (P-tuning v2's deep prompts; what enters the first is
    the gist rows themselves, and an offset after the last layer would reach no later token). Input rows
    alone are prompt tuning, which small models learn poorly; with the offsets every layer's keys/values
    at the gist positions are trained. The cache still keeps k tokens per prompt; the artifact grows by
    (layers - 1) x k x hidden.

    Attached by forward pre-hooks on the decoder's layers. `GistEmbedding` sets `where` (positions, row)
    when it splices the rows in, and the decoder's forward hook clears it, so a forward without the
    gist rows (the teacher, a cached decoding step) is left alone. Activation checkpointing would rerun
    the layers after that clear, so the config refuses the two together."""

    def __init__(self, decoder: nn.Module, init: torch.Tensor):
        super().__init__()
        later = decoder.layers[1:]
        if init.shape[0] != len(later):
            raise ValueError(f"{init.shape[0]} layer offsets for {len(later)} decoder layers after the first")
        self.layers = nn.ModuleList(_LayerOffset(rows) for rows in init)
        self.where = None
        for layer, offset in zip(later, self.layers):
            layer.register_forward_pre_hook(self._hook(offset), with_kwargs=True)
        decoder.register_forward_hook(lambda *_: setattr(self, "where", None))

    def _hook(self, offset: _LayerOffset):
        def add(_module, args, kwargs):
            if self.where is None:
                return None
            if args:
                return (offset(args[0], self.where), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": offset(kwargs["hidden_states"], self.where)}

        return add

    def stacked(self) -> torch.Tensor:
        """[layers - 1, k, hidden]: the artifact's layer_offsets (call inside zero.gather of `parameters()`)."""
        return torch.stack([layer.rows.detach() for layer in self.layers])


class _LayerKV(nn.Module):
    """One decoder layer's trained keys and values for the k gist positions, [k, kv_heads * head_dim] each,
    as the layer's k_proj / v_proj would output them (before RoPE and any k norm, which the layer applies)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = nn.Parameter(keys.clone()), nn.Parameter(values.clone())

    def forward(self, projected: torch.Tensor, where, which: str) -> torch.Tensor:
        positions, row = where
        rows = self.keys if which == "keys" else self.values
        return projected.index_put(positions, rows[row].to(projected.dtype))


def kv_projections(decoder: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(k_proj, v_proj) of every decoder layer; ValueError for attention that keeps no separate ones."""
    attention = [getattr(layer, "self_attn", None) for layer in getattr(decoder, "layers", None) or []]
    pairs = [(getattr(a, "k_proj", None), getattr(a, "v_proj", None)) for a in attention]
    if not pairs or any(k is None or v is None for k, v in pairs):
        raise ValueError("its decoder layers keep no separate self_attn.k_proj and v_proj to train")
    return pairs


class GistKV(nn.Module):
    """The gist positions' keys and values at every decoder layer as trained parameters (prefix tuning; what a
    gist KV cache stores, so what is trained is what is kept). Forward hooks on each layer's k_proj and v_proj
    replace their output at the gist positions; the layer then applies its own RoPE (and k norm) at those
    positions, so a forward over [header, gist, tail] gives the tail exactly what a cache of these entries
    gives it. `where` is set and cleared as for `GistLayerOffsets`. Initialised from the frozen model's own
    projections of the gist tokens read after the prompt (`capture`), so training starts from the untrained
    gist cache."""

    def __init__(self, decoder: nn.Module, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        pairs = kv_projections(decoder)
        if keys.shape[0] != len(pairs) or values.shape != keys.shape:
            raise ValueError(f"gist keys/values for {keys.shape[0]} layers, the decoder has {len(pairs)}")
        self.layers = nn.ModuleList(_LayerKV(k, v) for k, v in zip(keys, values))
        self.where = None
        for (k_proj, v_proj), layer in zip(pairs, self.layers):
            k_proj.register_forward_hook(self._hook(layer, "keys"))
            v_proj.register_forward_hook(self._hook(layer, "values"))
        decoder.register_forward_hook(lambda *_: setattr(self, "where", None))

    def _hook(self, layer: _LayerKV, which: str):
        def replace(_module, _args, output):
            return None if self.where is None else layer(output, self.where, which)

        return replace

    def stacked(self) -> torch.Tensor:
        """[layers, 2, k, kv_dim]: the artifact's `kv` (call inside zero.gather of `parameters()`)."""
        return torch.stack([torch.stack([layer.keys.detach(), layer.values.detach()]) for layer in self.layers])

    @staticmethod
    @torch.no_grad()
    def capture(decoder: nn.Module, run, gist_mask: torch.Tensor) -> torch.Tensor:
        """[layers, 2, k, kv_dim]: what each layer's k_proj / v_proj output at the gist positions during
        `run()` (a forward of one prompt + gist row; gist_mask [1, T] marks the gist positions)."""
        seen: list[torch.Tensor] = []
        hooks = [
            proj.register_forward_hook(lambda _m, _a, out: seen.append(out[gist_mask].detach().clone()))
            for pair in kv_projections(decoder)
            for proj in pair
        ]
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack(seen).unflatten(0, (-1, 2))
