"""The causal (decoder-only) gist KV cache and its batched greedy decoder.

Under the gist mask every token after the gist sees only the gist and later tokens, so the gist
positions' KV is all a later query needs. Build it from a left-padded batch of prompt+gist under
the mask, drop the prompt's entries, and continue through HF `generate` with `position_ids` that
resume where each row's prompt+gist ended (RoPE offsets differ per row): the logits equal those of
the full masked run (tests/test_gist_kv_cache.py).

What is kept per mask (the same code serves the controls):
    gist         the k gist entries
    pos_control  every prompt + gist entry (nothing is masked, so nothing can be dropped)
    neg_control  nothing (later tokens see neither prompt nor gist); positions still resume
With mask_prefix=visible (`prefix` = n) the first n entries of every row (template text identical for
every prompt) are kept too, in front: `shared` = n columns, counted once per model in the bytes report.

    cache = build_cache(model, [prompt + gist_ids, ...], gist_ids, "gist")
    answers = generate_from_cache(model, cache, [tail_ids, ...], max_new_tokens=32, eos_id=tok.eos_token_id)
    cache.row(0).save("prompt0.safetensors")                     # later, without the prompt:
    generate_from_cache(model, GistKVCache.load("prompt0.safetensors"), [tail], 32, tok.eos_token_id)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..data import pad_batch
from ..masks import model_inputs
from .decoding import cache_kwarg, cut_at_eos, device_dtype, padded_prompts, returned_cache


@dataclass
class GistKVCache:
    """Kept KV for a batch of prompts: per layer [B, kv_heads, C, head_dim], left-padded along C."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attention_mask: torch.Tensor  # [B, C], 0 on padding columns
    next_position: torch.Tensor  # [B], position of the first token after prompt + gist
    prompt_tokens: torch.Tensor  # [B], instruction tokens the cache replaces (for the bytes report)
    shared: int = 0  # leading columns identical for every prompt (the visible prefix)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def bytes_per_token(self) -> int:
        """KV bytes one cached token costs (all layers, keys + values)."""
        return sum(
            k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
            for k, v in zip(self.keys, self.values)
        )

    def nbytes(self) -> list[int]:
        """Per row: bytes of the entries this cache keeps for that prompt (padding and the shared prefix
        not counted)."""
        return [(int(n) - self.shared) * self.bytes_per_token() for n in self.attention_mask.sum(-1)]

    def shared_nbytes(self) -> int:
        """Bytes of the prefix entries every prompt shares: kept once per model."""
        return self.shared * self.bytes_per_token()

    def full_prompt_nbytes(self) -> list[int]:
        """Per row: bytes a plain prompt cache (every instruction token) would take instead."""
        return [int(p) * self.bytes_per_token() for p in self.prompt_tokens]

    def dynamic_cache(self):
        """A fresh HF DynamicCache over these tensors (generate grows it by concatenation, never in place)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)))

    def row(self, i: int) -> GistKVCache:
        """One prompt's cache, its padding columns dropped."""
        start = self.length - int(self.attention_mask[i].sum())
        return GistKVCache(
            [k[i : i + 1, :, start:].clone() for k in self.keys],
            [v[i : i + 1, :, start:].clone() for v in self.values],
            self.attention_mask[i : i + 1, start:].clone(),
            self.next_position[i : i + 1].clone(),
            self.prompt_tokens[i : i + 1].clone(),
            self.shared,
        )

    @staticmethod
    def stack(caches: list[GistKVCache]) -> GistKVCache:
        """Batch several caches (e.g. loaded one per prompt), left-padding shorter ones."""
        C = max(c.length for c in caches)
        if len({c.shared for c in caches}) > 1:
            raise ValueError("caches with different shared prefixes cannot be stacked")

        def lpad(t, dim):  # zeros in front along `dim` up to C
            shape = list(t.shape)
            shape[dim] = C - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim)

        layers = range(len(caches[0].keys))
        return GistKVCache(
            [torch.cat([lpad(c.keys[i], 2) for c in caches]) for i in layers],
            [torch.cat([lpad(c.values[i], 2) for c in caches]) for i in layers],
            torch.cat([lpad(c.attention_mask, 1) for c in caches]),
            torch.cat([c.next_position for c in caches]),
            torch.cat([c.prompt_tokens for c in caches]),
            caches[0].shared,
        )

    def save(self, path, meta: dict | None = None):
        tensors = {
            "attention_mask": self.attention_mask,
            "next_position": self.next_position,
            "prompt_tokens": self.prompt_tokens,
        }
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"keys.{layer}"], tensors[f"values.{layer}"] = k.contiguous(), v.contiguous()
        save_file(
            tensors,
            str(path),
            metadata={
                "format": "gist-kv",
                "num_layers": str(len(self.keys)),
                "shared": str(self.shared),
                "meta": json.dumps(meta or {}),
            },
        )

    @classmethod
    def load(cls, path) -> GistKVCache:
        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            shared = int(f.metadata()["shared"])
        n = sum(1 for name in t if name.startswith("keys."))
        return cls(
            [t[f"keys.{i}"] for i in range(n)],
            [t[f"values.{i}"] for i in range(n)],
            t["attention_mask"],
            t["next_position"],
            t["prompt_tokens"],
            shared,
        )


def kept_entries(mask: str, num_gist: int, padded_length: int) -> int:
    """How many trailing prompt+gist entries later tokens can see under `mask`."""
    return {"gist": num_gist, "pos_control": padded_length, "neg_control": 0}[mask]


def empty_layers(model, batch: int) -> list[torch.Tensor]:
    """Per layer an empty [B, kv_heads, 0, head_dim] tensor: a cache that holds nothing."""
    device, dtype = device_dtype(model)
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return [torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)] * cfg.num_hidden_layers


@torch.no_grad()
def build_cache(
    model, prompts: list[list[int]], gist_ids: list[int], mask: str = "gist", embed=None, prefix: int = 0
) -> GistKVCache:
    """One forward over left-padded prompt+gist rows (each ending in the gist ids) under `mask`.

    `embed(input_ids) -> inputs_embeds` splices trained gist rows in (distill artifacts); `prefix`:
    the rows' first tokens that stay visible (mask_prefix=visible), kept in front of the gist entries."""
    device, dtype = device_dtype(model)
    k = len(gist_ids)
    batch = padded_prompts(prompts, gist_ids)
    lengths = batch["attention_mask"].sum(-1)
    L = batch["input_ids"].shape[1]
    keep = kept_entries(mask, k, L)
    shared = prefix if mask != "pos_control" else 0  # pos_control keeps every entry anyway
    if shared and int(lengths.min()) < shared + k:
        raise ValueError(f"a prompt is shorter than its {shared} visible prefix tokens + {k} gist tokens")
    keys, values = [], []
    if keep or shared:  # neg_control without a prefix keeps nothing: skipped on every rank alike (ZeRO-3)
        on_device = {name: t.to(device) for name, t in batch.items()}  # the 4D mask is built there
        inputs = model_inputs(on_device, gist_ids, mask, dtype, prefix=prefix)
        if embed is not None:
            inputs["inputs_embeds"] = embed(inputs.pop("input_ids"))
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        # the prefix's columns: each row's first real tokens (rows are left-padded)
        cols = (L - lengths.to(device))[:, None] + torch.arange(shared, device=device)
        for layer in returned_cache(out).layers:
            at = cols[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            keys.append(torch.cat([layer.keys.gather(2, at), layer.keys[:, :, L - keep :]], 2))
            values.append(torch.cat([layer.values.gather(2, at), layer.values[:, :, L - keep :]], 2))
    else:
        keys = values = empty_layers(model, len(prompts))
    book = device if device.type != "meta" else "cpu"  # weightless FLOP counts still need real positions
    kept_mask = torch.cat(
        [torch.ones(len(prompts), shared, dtype=batch["attention_mask"].dtype), batch["attention_mask"][:, L - keep :]],
        1,
    )
    return GistKVCache(keys, values, kept_mask.to(book), lengths.to(book), (lengths - k - shared).to(book), shared)


@torch.no_grad()
def generate_from_cache(
    model,
    cache: GistKVCache,
    tails: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Greedy answers after each row's cache: tails (e.g. "\\nInput: ...\\nOutput:") left-padded,
    positions resuming at cache.next_position. Returns the new ids per row, cut at the first eos."""
    from transformers import GenerationConfig

    device, _ = device_dtype(model)
    batch = pad_batch([{"input_ids": list(t)} for t in tails], pad_id=pad_id, left=True)
    tail_mask = batch["attention_mask"].to(device)
    T = tail_mask.shape[1]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True
    )
    out = model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=torch.cat([cache.attention_mask.long(), tail_mask], 1),
        position_ids=cache.next_position[:, None] + (tail_mask.cumsum(-1) - 1).clamp_min(0),
        **{cache_kwarg(model): cache.dynamic_cache()},
        generation_config=config,
        synced_gpus=synced_gpus,
    )
    return [cut_at_eos(row.tolist(), eos_id) for row in out[:, T:]]


def greedy(
    model, prompts, tails, gist_ids, mask, max_new_tokens, eos_id, pad_id=0, embed=None, synced_gpus=False, prefix=0
):
    """The batched greedy decoder: cache each prompt (token ids ending in the gist ids; none for a plain
    prompt cache, mask pos_control) under `mask`, then answer after each tail (token ids). Returns
    (answers, cache). The seq2seq decoder takes the same arguments (loader.DECODERS)."""
    cache = build_cache(model, prompts, gist_ids, mask, embed=embed, prefix=prefix)
    return generate_from_cache(model, cache, tails, max_new_tokens, eos_id, pad_id, synced_gpus), cache


@torch.no_grad()
def generate_uncached(model, prompts, tails, gist_ids, mask, max_new_tokens, eos_id, embed=None, prefix=0):
    """Reference: greedy decoding that reruns the whole prompt + gist + tail + answer under the mask
    every step (no cache at all). Slow; for checking the cached path."""
    device, dtype = device_dtype(model)
    seqs = [list(p) + list(t) for p, t in zip(prompts, tails)]
    answers: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    for _ in range(max_new_tokens):
        batch = pad_batch([{"input_ids": s + a} for s, a in zip(seqs, answers)], pad_id=0, left=True)
        inputs = model_inputs({name: t.to(device) for name, t in batch.items()}, gist_ids, mask, dtype, prefix=prefix)
        if embed is not None:
            inputs["inputs_embeds"] = embed(inputs.pop("input_ids"))
        nxt = model(**inputs, use_cache=False).logits[:, -1].argmax(-1).tolist()
        for i, token in enumerate(nxt):
            if not done[i]:
                answers[i].append(token)
                done[i] = token == eos_id
        if all(done):
            break
    return [cut_at_eos(a, eos_id) for a in answers]
