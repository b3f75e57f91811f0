"""Gist tokens: registering them, initialising their embeddings, and the gist-row splice.

Two ways to hold the gist embeddings, one per objective:
- fine-tune: the vocabulary grows by k rows (`init_gist_embeddings`), trained with the model;
- distill: the vocabulary is untouched and a separate [k, hidden] parameter (`GistEmbedding`)
  is spliced in at the gist positions, PEFT prompt-tuning style; training and inference share it.
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

    def __init__(self, gist_ids: list[int], init: torch.Tensor):
        super().__init__()
        ids = list(gist_ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"gist ids must be consecutive, got {ids}")
        if init.shape[0] != len(ids):
            raise ValueError(f"{init.shape[0]} gist rows for {len(ids)} gist ids")
        self.gist = nn.Parameter(init.clone())  # [k, hidden]
        self.register_buffer("gist_ids", torch.tensor(ids, device=init.device), persistent=False)

    def forward(self, input_ids: torch.Tensor | None = None, embedding: nn.Module | None = None, *,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings from `embedding`, with the gist rows taken from this parameter; or, given
        `hidden` ([N, hidden]), the output side of a tied model: those rows' logits for the gist ids, [N, k].
        Both go through the module call, so ZeRO-3 gathers the parameter for either use."""
        if hidden is not None:
            return hidden @ self.gist.to(hidden.dtype).T
        is_gist = torch.isin(input_ids, self.gist_ids)
        emb = embedding(torch.where(is_gist, torch.zeros_like(input_ids), input_ids))
        index = (input_ids - self.gist_ids[0]).clamp(0, len(self.gist_ids) - 1)
        return torch.where(is_gist[..., None], self.gist[index].to(emb.dtype), emb)
