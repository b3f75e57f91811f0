"""Inference, written once: the gist KV cache, the batched greedy decoder, and the run loader.

Eval, generate, compress (teacher answers), fidelity, latency and the FLOPs check all use these.
Encoder-decoder models (T5) have their own cache in seq2seq_inference; `RunModel.answer` picks by family.

Gist KV caching: run prompt + gist once, keep only the gist tokens' keys/values, answer from them.

Under the gist mask every token after the gist sees only the gist and later tokens, so the gist
positions' KV is all a later query needs. Build it from a left-padded batch of prompt+gist under
the mask, drop the prompt's entries, and continue through HF `generate` with
`position_ids` that resume where each row's prompt+gist ended (RoPE offsets differ per row):
the logits equal those of the full masked run (DESIGN.md, "mask proof").

What is kept per mask (the same code serves the controls):
    gist         the k gist entries
    pos_control  every prompt + gist entry (nothing is masked, so nothing can be dropped)
    neg_control  nothing (later tokens see neither prompt nor gist); positions still resume
With mask_prefix=visible (`prefix` = n) the first n entries of every row (template text identical for
every prompt, so identical keys/values) are kept too, in front: `shared` = n columns that are the same
for every prompt, counted once per model in the bytes report (nbytes leaves them out) although each
row of a batch holds its own copy (HF's cache wants [B, ...]).

    cache = build_cache(model, [prompt + gist_ids, ...], gist_ids, "gist")
    answers = generate_from_cache(model, cache, [tail_ids, ...], max_new_tokens=32, eos_id=tok.eos_token_id)
    cache.row(0).save("prompt0.safetensors")                     # later, without the prompt:
    generate_from_cache(model, GistKVCache.load("prompt0.safetensors"), [tail], 32, tok.eos_token_id)

    run = load_run("runs/tiny")                                  # final/ or a distill artifact
    gm = GistModel.load("runs/compress"); gm.generate("What are your opening hours?")
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import artifact, zero
from .config import ModelConfig
from .data import GistTemplate, pad_batch
from .masks import make_attention_mask, model_inputs
from .model import load_model, load_tokenizer, model_family
from .tokens import GistEmbedding, GistLayerOffsets, add_gist_tokens

FINAL_META = "gist_model.json"  # final/ of a fine-tuned run; runs before 2026-12-03 named it gist_config.json


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
        return sum(k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
                   for k, v in zip(self.keys, self.values))

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

    def row(self, i: int) -> "GistKVCache":
        """One prompt's cache, its padding columns dropped."""
        start = self.length - int(self.attention_mask[i].sum())
        return GistKVCache([k[i:i + 1, :, start:].clone() for k in self.keys],
                           [v[i:i + 1, :, start:].clone() for v in self.values],
                           self.attention_mask[i:i + 1, start:].clone(), self.next_position[i:i + 1].clone(),
                           self.prompt_tokens[i:i + 1].clone(), self.shared)

    @staticmethod
    def stack(caches: list["GistKVCache"]) -> "GistKVCache":
        """Batch several caches (e.g. loaded one per prompt), left-padding shorter ones."""
        C = max(c.length for c in caches)
        if len({c.shared for c in caches}) > 1:
            raise ValueError("caches with different shared prefixes cannot be stacked")

        def lpad(t, dim):  # zeros in front along `dim` up to C
            shape = list(t.shape)
            shape[dim] = C - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim)

        layers = range(len(caches[0].keys))
        return GistKVCache([torch.cat([lpad(c.keys[l], 2) for c in caches]) for l in layers],
                           [torch.cat([lpad(c.values[l], 2) for c in caches]) for l in layers],
                           torch.cat([lpad(c.attention_mask, 1) for c in caches]),
                           torch.cat([c.next_position for c in caches]), torch.cat([c.prompt_tokens for c in caches]),
                           caches[0].shared)

    def save(self, path, meta: dict | None = None):
        tensors = {"attention_mask": self.attention_mask, "next_position": self.next_position,
                   "prompt_tokens": self.prompt_tokens}
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"keys.{layer}"], tensors[f"values.{layer}"] = k.contiguous(), v.contiguous()
        save_file(tensors, str(path), metadata={"format": "gist-kv", "num_layers": str(len(self.keys)),
                                                "shared": str(self.shared), "meta": json.dumps(meta or {})})

    @classmethod
    def load(cls, path) -> "GistKVCache":
        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            shared = int((f.metadata() or {}).get("shared", 0))  # files before mask_prefix: none
        n = sum(1 for name in t if name.startswith("keys."))
        return cls([t[f"keys.{i}"] for i in range(n)], [t[f"values.{i}"] for i in range(n)],
                   t["attention_mask"], t["next_position"], t["prompt_tokens"], shared)


def kept_entries(mask: str, num_gist: int, padded_length: int) -> int:
    """How many trailing prompt+gist entries later tokens can see under `mask`."""
    return {"gist": num_gist, "pos_control": padded_length, "neg_control": 0}[mask]


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def empty_layers(model, batch: int) -> list[torch.Tensor]:
    """Per layer an empty [B, kv_heads, 0, head_dim] tensor: a cache that holds nothing."""
    device, dtype = _device_dtype(model)
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return [torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)] * cfg.num_hidden_layers


def padded_prompts(prompts: list[list[int]], gist_ids: list[int]) -> dict:
    """Left-padded prompt + gist rows (the gist ids last in every row, so at the same columns)."""
    k = len(gist_ids)
    for p in prompts:
        if k and list(p[-k:]) != list(gist_ids):
            raise ValueError("every prompt must end with the gist tokens")
    return pad_batch([{"input_ids": list(p)} for p in prompts], pad_id=0, left=True)


@torch.no_grad()
def build_cache(model, prompts: list[list[int]], gist_ids: list[int], mask: str = "gist",
                embed=None, prefix: int = 0) -> GistKVCache:
    """One forward over left-padded prompt+gist rows (each ending in the gist ids) under `mask`.

    `embed(input_ids) -> inputs_embeds` splices trained gist rows in (distill artifacts); `prefix`:
    the rows' first tokens that stay visible (mask_prefix=visible), kept in front of the gist entries."""
    device, dtype = _device_dtype(model)
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
        for layer in out.past_key_values.layers:
            at = cols[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            keys.append(torch.cat([layer.keys.gather(2, at), layer.keys[:, :, L - keep:]], 2))
            values.append(torch.cat([layer.values.gather(2, at), layer.values[:, :, L - keep:]], 2))
    else:
        keys = values = empty_layers(model, len(prompts))
    book = device if device.type != "meta" else "cpu"  # weightless FLOP counts still need real positions
    kept_mask = torch.cat([torch.ones(len(prompts), shared, dtype=batch["attention_mask"].dtype),
                           batch["attention_mask"][:, L - keep:]], 1)
    return GistKVCache(keys, values, kept_mask.to(book), lengths.to(book), (lengths - k - shared).to(book), shared)


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


def greedy(model, prompts: list[list[int]], tails: list[list[int]], gist_ids: list[int], mask: str,
           max_new_tokens: int, eos_id: int, pad_id: int = 0, embed=None, synced_gpus: bool = False, prefix: int = 0):
    """The batched greedy decoder: cache each prompt (ending in the gist ids; none for a plain prompt
    cache, mask pos_control) under `mask`, then answer after each tail. Returns (answers, cache)."""
    cache = build_cache(model, prompts, gist_ids, mask, embed=embed, prefix=prefix)
    return generate_from_cache(model, cache, tails, max_new_tokens, eos_id, pad_id, synced_gpus), cache


@torch.no_grad()
def generate_uncached(model, prompts: list[list[int]], tails: list[list[int]], gist_ids: list[int], mask: str,
                      max_new_tokens: int, eos_id: int, embed=None, prefix: int = 0) -> list[list[int]]:
    """Reference: greedy decoding that reruns the whole prompt + gist + tail + answer under the mask
    every step (no cache at all). Slow; for checking the cached path."""
    device, dtype = _device_dtype(model)
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
    return [_cut_at_eos(a, eos_id) for a in answers]


# Caching strategies compared by the FLOPs and latency reports (one prompt at a time):
#   none         nothing cached: the first forward reads instruction + tail
#   instruction  a plain prompt cache: every instruction token's KV kept
#   gist         instruction + gist run once, only the k gist entries kept
STRATEGIES = ("none", "instruction", "gist")


def strategy_cache(model, prompt: list[int], gist_ids: list[int], strategy: str, prefix: int = 0) -> GistKVCache:
    """One prompt's cache under a caching strategy; `prefix`: the prompt's first tokens the gist strategy
    also keeps (mask_prefix=visible; shared by every prompt, so not counted in its bytes)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown caching strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy == "instruction":
        return build_cache(model, [prompt], [], "pos_control")
    if strategy == "gist":
        return build_cache(model, [list(prompt) + list(gist_ids)], gist_ids, "gist", prefix=prefix)
    zeros = torch.zeros(1, dtype=torch.long)
    return GistKVCache(empty_layers(model, 1), empty_layers(model, 1), torch.zeros(1, 0, dtype=torch.long), zeros, zeros)


def first_token_input(prompt: list[int], tail: list[int], strategy: str) -> list[int]:
    return prompt + tail if strategy == "none" else tail


def attention_mask_4d(new: int, past: int, dtype, device="cpu") -> torch.Tensor:
    """[1, 1, new, past+new] float mask: every cached key visible, causal among the new tokens."""
    allowed = torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = torch.zeros(1, 1, new, past + new, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def forward_after(model, ids: list[int], prefix: GistKVCache, cache=None, logits_to_keep: int = 1):
    """One forward of `ids` after a one-prompt cache (or after `cache`, the DynamicCache it grew into),
    positions resuming where the prefix ended; explicit 4D mask (FlopCounterMode on meta weights needs one)."""
    cache = prefix.dynamic_cache() if cache is None else cache
    past = cache.get_seq_length()
    start = int(prefix.next_position[0]) + past - prefix.length
    device, dtype = _device_dtype(model)  # device "meta" for weightless FLOP counts
    return model(input_ids=torch.tensor([ids], device=device),
                 attention_mask=attention_mask_4d(len(ids), past, dtype, device),
                 position_ids=torch.arange(start, start + len(ids), device=device)[None],
                 past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)


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
    family: str = "causal"  # "seq2seq" for encoder-decoder models (T5): seq2seq_inference answers
    prefix: int = 0  # leading template tokens the run kept visible (mask_prefix=visible); 0: hidden

    def answer(self, prompts: list[list[int]], tails: list[list[int]], max_new_tokens: int, synced_gpus: bool = False):
        """Batched greedy answers by this run's family and mask: (answers, cache with nbytes / full_prompt_nbytes)."""
        if self.family == "seq2seq":
            from .seq2seq_inference import greedy_seq2seq  # that module imports this one
            return greedy_seq2seq(self.model, prompts, tails, self.gist_ids, self.mask, max_new_tokens,
                                  self.tok.eos_token_id, self.tok.pad_token_id, embed=self.embed, synced_gpus=synced_gpus)
        return greedy(self.model, prompts, tails, self.gist_ids, self.mask, max_new_tokens, self.tok.eos_token_id,
                      self.tok.pad_token_id, embed=self.embed, synced_gpus=synced_gpus, prefix=self.prefix)


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
    meta_file = next((f for f in (final / FINAL_META, final / artifact.CONFIG) if f.is_file()), None)
    if meta_file is not None:
        meta = json.loads(meta_file.read_text())
        tok = AutoTokenizer.from_pretrained(final)
        cfg = dataclasses.replace(model_cfg, name=str(final), tokenizer="")
        model = load_inference_model(cfg, ds_config)  # load_model picks the seq2seq class from the saved config
        return RunModel(model, tok, tok.convert_tokens_to_ids(meta["gist_tokens"]),
                        meta.get("mask", meta.get("mode")), source=str(final), meta=meta,
                        template=run_template(out, meta), family=model_family(model.config),
                        prefix=meta.get("mask_prefix_tokens", 0))
    if not (out / artifact.WEIGHTS).is_file():
        raise FileNotFoundError(f"{out}: no trained model here (neither final/ nor {artifact.WEIGHTS}); train into it first")
    meta = artifact.load(out)[1]
    cfg = dataclasses.replace(model_cfg, name=model_cfg.name or meta["base_model"],
                              tokenizer=model_cfg.tokenizer or meta.get("tokenizer", ""))
    tok = load_tokenizer(cfg)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, meta["num_gist"])
    model = load_inference_model(cfg, ds_config, vocab_min=num_old)
    embedding = model.get_input_embeddings()
    with zero.gather([embedding.weight]):  # the fingerprint check reads the whole embedding
        gist, meta = artifact.load(out, expected_fingerprint=artifact.BaseModel(model.config, embedding.weight))
    like = dict(device=embedding.weight.device, dtype=embedding.weight.dtype)
    offsets = artifact.load_layer_offsets(out)
    if offsets is not None:  # hooked onto the decoder's layers: every forward of this model with gist rows adds them
        offsets = GistLayerOffsets(model.get_decoder(), offsets.to(**like))
    rows = GistEmbedding(gist_ids, gist.to(**like), offsets).eval()
    return RunModel(model, tok, gist_ids, "gist", embed=lambda ids: rows(ids, embedding),
                    source=f"{cfg.name} + {out / artifact.WEIGHTS}", meta=meta, gist=rows.gist.detach(),
                    template=run_template(out, meta), family=model_family(model.config),
                    prefix=meta.get("mask_prefix_tokens", 0))


class GistModel:
    """A distill artifact in use: the base model with k trained gist embeddings in place of a prompt."""

    def __init__(self, run: RunModel):
        self.run, self.model, self.tok, self.meta = run, run.model, run.tok, run.meta
        self.template = GistTemplate(run.tok, run.gist_ids, max_length=1 << 30, template=run.template or "alpaca")

    @classmethod
    def load(cls, directory, model_name: str | None = None, tokenizer: str | None = None) -> "GistModel":
        return cls(load_run(directory, ModelConfig(name=model_name or "", tokenizer=tokenizer or "")))

    def prompt_and_tail(self, query: str, instruction: str | None = None) -> tuple[list[int], list[int]]:
        """(instruction when the artifact was trained with it visible + gist tokens, the query's tail)."""
        prompt, tail, _ = self.template.pieces({"instruction": instruction or "-", "input": query, "output": ""})
        return (prompt if instruction is not None else self.template.prefix) + self.run.gist_ids, tail

    def prompt_ids(self, query: str, instruction: str | None = None) -> list[int]:
        """The whole input for teacher-forced scoring: prompt_and_tail joined."""
        prompt, tail = self.prompt_and_tail(query, instruction)
        return prompt + tail

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T, vocab] logits of one sequence under the gist mask (teacher-forced scoring)."""
        device = _device_dtype(self.model)[0]
        input_ids = torch.tensor([ids], device=device)
        mask = make_attention_mask(input_ids, torch.ones_like(input_ids), self.run.gist_ids, "gist", self.model.dtype,
                                   prefix=self.run.prefix)
        return self.model(inputs_embeds=self.run.embed(input_ids), attention_mask=mask,
                          position_ids=torch.arange(len(ids), device=device)[None]).logits[0]

    def generate(self, query: str, instruction: str | None = None, max_new_tokens: int = 64) -> str:
        """Greedy answer. Without an instruction the gist embeddings stand in for the prompt."""
        prompt, tail = self.prompt_and_tail(query, instruction)
        answers, _ = greedy(self.model, [prompt], [tail], self.run.gist_ids, "gist", max_new_tokens,
                            self.tok.eos_token_id, self.tok.pad_token_id, embed=self.run.embed, prefix=self.run.prefix)
        return self.tok.decode(answers[0], skip_special_tokens=True).strip()
