"""Gist KV caching: run prompt + gist once, keep only the gist tokens' keys/values, answer from them.

Under the gist mask every token after the gist sees only the gist and later tokens, so the gist
positions' KV is all a later query needs. Build it from a left-padded batch of prompt+gist under
the mode's mask, drop the prompt's entries, and continue through HF `generate` with
`position_ids` that resume where each row's prompt+gist ended (RoPE offsets differ per row):
the logits equal those of the full masked run (DESIGN.md, "mask proof").

What is kept per mode (the same code serves the controls):
    gist         the k gist entries
    pos_control  every prompt + gist entry (nothing is masked, so nothing can be dropped)
    neg_control  nothing (later tokens see neither prompt nor gist); positions still resume

    cache = build_cache(model, [prompt + gist_ids, ...], gist_ids, "gist")
    answers = generate_from_cache(model, cache, [tail_ids, ...], max_new_tokens=32, eos_id=tok.eos_token_id)
    cache.row(0).save("prompt0.safetensors")                     # later, without the prompt:
    generate_from_cache(model, GistKVCache.load("prompt0.safetensors"), [tail], 32, tok.eos_token_id)
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from .data import model_inputs, pad_batch


@dataclass
class GistKVCache:
    """Kept KV for a batch of prompts: per layer [B, kv_heads, C, head_dim], left-padded along C."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attention_mask: torch.Tensor  # [B, C], 0 on padding columns
    next_position: torch.Tensor  # [B], position of the first token after prompt + gist
    prompt_tokens: torch.Tensor  # [B], instruction tokens the cache replaces (for the bytes report)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def bytes_per_token(self) -> int:
        """KV bytes one cached token costs (all layers, keys + values)."""
        return sum(k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
                   for k, v in zip(self.keys, self.values))

    def nbytes(self) -> list[int]:
        """Per row: bytes of the entries this cache really keeps (padding not counted)."""
        return [int(n) * self.bytes_per_token() for n in self.attention_mask.sum(-1)]

    def full_prompt_nbytes(self) -> list[int]:
        """Per row: bytes a plain prompt cache (every instruction token) would take instead."""
        return [int(p) * self.bytes_per_token() for p in self.prompt_tokens]

    def dynamic_cache(self):
        """A fresh HF DynamicCache over these tensors (generate grows it by concatenation, never in place)."""
        from transformers import DynamicCache
        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)))

    def row(self, i: int) -> "GistKVCache":
        """One prompt's cache, its padding columns dropped."""
        start = self.length - int(self.attention_mask[i].sum())
        return GistKVCache([k[i:i + 1, :, start:].clone() for k in self.keys],
                           [v[i:i + 1, :, start:].clone() for v in self.values],
                           self.attention_mask[i:i + 1, start:].clone(), self.next_position[i:i + 1].clone(),
                           self.prompt_tokens[i:i + 1].clone())

    @staticmethod
    def stack(caches: list["GistKVCache"]) -> "GistKVCache":
        """Batch several caches (e.g. loaded one per prompt), left-padding shorter ones."""
        C = max(c.length for c in caches)

        def lpad(t, dim):  # zeros in front along `dim` up to C
            shape = list(t.shape)
            shape[dim] = C - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim)

        layers = range(len(caches[0].keys))
        return GistKVCache([torch.cat([lpad(c.keys[l], 2) for c in caches]) for l in layers],
                           [torch.cat([lpad(c.values[l], 2) for c in caches]) for l in layers],
                           torch.cat([lpad(c.attention_mask, 1) for c in caches]),
                           torch.cat([c.next_position for c in caches]), torch.cat([c.prompt_tokens for c in caches]))

    def save(self, path, meta: dict | None = None):
        tensors = {"attention_mask": self.attention_mask, "next_position": self.next_position,
                   "prompt_tokens": self.prompt_tokens}
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"keys.{layer}"], tensors[f"values.{layer}"] = k.contiguous(), v.contiguous()
        save_file(tensors, str(path), metadata={"format": "gist-kv", "num_layers": str(len(self.keys)),
                                                "meta": json.dumps(meta or {})})

    @classmethod
    def load(cls, path) -> "GistKVCache":
        t = load_file(str(path))
        n = sum(1 for name in t if name.startswith("keys."))
        return cls([t[f"keys.{i}"] for i in range(n)], [t[f"values.{i}"] for i in range(n)],
                   t["attention_mask"], t["next_position"], t["prompt_tokens"])


def kept_entries(mode: str, num_gist: int, padded_length: int) -> int:
    """How many trailing prompt+gist entries later tokens can see under `mode`'s mask."""
    return {"gist": num_gist, "pos_control": padded_length, "neg_control": 0}[mode]


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def build_cache(model, prompts: list[list[int]], gist_ids: list[int], mode: str = "gist",
                embed=None) -> GistKVCache:
    """One forward over left-padded prompt+gist rows (each ending in the gist ids) under `mode`'s mask.

    `embed(input_ids) -> inputs_embeds` splices trained gist rows in (distill artifacts)."""
    device, dtype = _device_dtype(model)
    k = len(gist_ids)
    for p in prompts:
        if list(p[-k:]) != list(gist_ids):
            raise ValueError("every prompt must end with the gist tokens")
    batch = pad_batch([{"input_ids": list(p)} for p in prompts], pad_id=0, left=True)
    lengths = batch["attention_mask"].sum(-1)
    L = batch["input_ids"].shape[1]
    keep = kept_entries(mode, k, L)
    keys, values = [], []
    if keep:  # neg_control keeps nothing: skipped on every rank alike, so ZeRO-3 collectives still match
        inputs = {name: t.to(device) for name, t in model_inputs(batch, gist_ids, mode, dtype).items()}
        if embed is not None:
            inputs["inputs_embeds"] = embed(inputs.pop("input_ids"))
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        for layer in out.past_key_values.layers:
            keys.append(layer.keys[:, :, L - keep:].clone())
            values.append(layer.values[:, :, L - keep:].clone())
    else:
        cfg = model.config
        heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        empty = torch.zeros(len(prompts), heads, 0, head_dim, dtype=dtype, device=device)
        keys = [empty] * cfg.num_hidden_layers
        values = [empty] * cfg.num_hidden_layers
    return GistKVCache(keys, values, batch["attention_mask"][:, L - keep:].to(device), lengths.to(device),
                       (lengths - k).to(device))


@torch.no_grad()
def generate_from_cache(model, cache: GistKVCache, tails: list[list[int]], max_new_tokens: int, eos_id: int,
                        pad_id: int = 0, synced_gpus: bool = False) -> list[list[int]]:
    """Greedy answers after each row's cache: tails (e.g. "\\nInput: ...\\nOutput:") left-padded,
    positions resuming at cache.next_position. Returns the new ids per row, cut at the first eos."""
    from transformers import GenerationConfig

    device, _ = _device_dtype(model)
    batch = pad_batch([{"input_ids": list(t)} for t in tails], pad_id=pad_id, left=True)
    tail_mask = batch["attention_mask"].to(device)
    T = tail_mask.shape[1]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=pad_id, use_cache=True)
    out = model.generate(input_ids=batch["input_ids"].to(device),
                         attention_mask=torch.cat([cache.attention_mask.long(), tail_mask], 1),
                         position_ids=cache.next_position[:, None] + (tail_mask.cumsum(-1) - 1).clamp_min(0),
                         past_key_values=cache.dynamic_cache(), generation_config=config, synced_gpus=synced_gpus)
    return [_cut_at_eos(row.tolist(), eos_id) for row in out[:, T:]]


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def generate_uncached(model, prompts: list[list[int]], tails: list[list[int]], gist_ids: list[int], mode: str,
                      max_new_tokens: int, eos_id: int, embed=None) -> list[list[int]]:
    """Reference: greedy decoding that reruns the whole prompt + gist + tail + answer under the mask
    every step (no cache at all). Slow; for checking the cached path."""
    device, dtype = _device_dtype(model)
    seqs = [list(p) + list(t) for p, t in zip(prompts, tails)]
    answers: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    for _ in range(max_new_tokens):
        batch = pad_batch([{"input_ids": s + a} for s, a in zip(seqs, answers)], pad_id=0, left=True)
        inputs = {name: t.to(device) for name, t in model_inputs(batch, gist_ids, mode, dtype).items()}
        if embed is not None:
            inputs["inputs_embeds"] = embed(inputs.pop("input_ids"))
        nxt = model(**inputs, use_cache=False).logits[:, -1].argmax(-1).tolist()
        for i, token in enumerate(nxt):
            if not done[i]:
                answers[i].append(token)
                done[i] = token == eos_id
        if all(done):
            break
    return [_cut_at_eos(a, eos_id) for a in answers]
