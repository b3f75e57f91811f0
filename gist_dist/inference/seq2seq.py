"""Gist caching for encoder-decoder models (T5, FLAN-T5): encode prompt + gist once, keep only what
later inputs may see, then answer any number of inputs from it.

Under the encoder gist mask (seq2seq_masks) prompt and gist positions never see the input, and input
tokens see only gist + input. So at every encoder layer the gist positions' hidden states do not
depend on the input, and they are all an input token's attention needs there (the layer's own norm
and k/v projections turn them into keys/values: k rows, recomputed per request). The decoder's
cross-attention reaches gist + input only, so the final encoder output at the gist positions is kept
for it. A request then encodes only its input tokens, as queries over [cached gist ; input].

Positions: T5's relative position bias depends only on the key - query distance. Laying a request
out as [gist (k) ; input] gives every (input, gist) and (input, input) pair the distance it has in
the full prompt + gist + input sequence, padding aside (tests/test_seq2seq_inference.py compares the
bias slices). Cross-attention has no position bias.

What is kept per mask:
    gist         per encoder layer the k gist states, and the k final outputs
    neg_control  nothing: input tokens see neither prompt nor gist, so the input is encoded alone
    pos_control  nothing can be: every prompt state depends on the input (the uncached path answers)

    cache = build_seq2seq_cache(model, [prompt + gist_ids, ...], gist_ids, "gist")
    states, cross = encode_after_cache(model, cache, [input_ids, ...])     # one request's encoder work
    answers = generate_from_encoder(model, states, cross, 32, tok.eos_token_id)

HF's T5 forward hands its `attention_mask` to the encoder and to the cross-attention alike, so here
the encoder is run on its own and the decoder gets only the cross-attention mask. Eval mode only
(dropout is not applied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import pad_batch
from ..seq2seq_masks import cross_keys, seq2seq_masks
from .decoding import cut_at_eos, device_dtype, padded_prompts


@dataclass
class Seq2SeqGistCache:
    """What a batch of prompts leaves for later inputs: per encoder layer [B, k, d] states, [B, k, d] output."""

    states: list[torch.Tensor]  # per layer: the gist positions' hidden states entering it
    output: torch.Tensor  # final encoder output at the gist positions (what cross-attention reads)
    prompt_tokens: torch.Tensor  # [B], instruction tokens the cache replaces (for the bytes report)
    kept: torch.Tensor  # [B], prompt + gist positions a request needs: k; 0 (neg_control); all (pos_control)

    def bytes_per_token(self) -> int:
        """Bytes one kept position costs: its state entering every layer, and its final output."""
        return (len(self.states) + 1) * self.output.shape[-1] * self.output.element_size()

    def nbytes(self) -> list[int]:
        return [int(n) * self.bytes_per_token() for n in self.kept]

    def full_prompt_nbytes(self) -> list[int]:
        """Per row: bytes the same states of every instruction token would take instead."""
        return [int(p) * self.bytes_per_token() for p in self.prompt_tokens]


def _embed(model, input_ids, embed=None):
    """Token embeddings; `embed(ids)` splices trained gist rows in (distill artifacts)."""
    return embed(input_ids) if embed is not None else model.get_input_embeddings()(input_ids)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def run_encoder_layers(model, x, mask, prefix: list[torch.Tensor]):
    """T5's encoder on embeddings x [B, n, d] where each layer l attends over [prefix[l] ; x]
    (prefix[l]: [B, k, d] hidden states of positions placed just before x), additive mask [B, 1, n, k + n].
    Returns (final output [B, n, d], the hidden states entering each layer)."""
    encoder = model.get_encoder()
    k, n = prefix[0].shape[1], x.shape[1]
    # queries sit at k .. k+n-1, keys at 0 .. k+n-1: the distances of the full sequence
    bias = encoder.block[0].layer[0].SelfAttention.compute_bias(n, k + n, x.device, past_seen_tokens=k)
    entering = []
    for block, before in zip(encoder.block, prefix):
        entering.append(x)
        attn = block.layer[0]
        normed = attn.layer_norm(x)
        keys = torch.cat([attn.layer_norm(before), normed], 1)
        # key_value_states: T5Attention's own path for keys/values that are not only the queries
        x = x + attn.SelfAttention(normed, mask=mask, key_value_states=keys, position_bias=bias)[0]
        x = block.layer[-1](x)  # feed-forward, with its own norm and residual
    return encoder.final_layer_norm(x), entering


def _empty_layers(model, batch: int) -> list[torch.Tensor]:
    device, dtype = device_dtype(model)
    d = model.config.d_model
    return [torch.zeros(batch, 0, d, device=device, dtype=dtype) for _ in range(model.config.num_layers)]


@torch.no_grad()
def build_seq2seq_cache(
    model, prompts: list[list[int]], gist_ids: list[int], mask: str = "gist", embed=None
) -> Seq2SeqGistCache:
    """Encode left-padded prompt + gist rows (each ending in the gist ids) once; keep the gist states."""
    if mask == "pos_control":
        raise ValueError(
            "pos_control: every prompt state depends on the input, nothing can be cached "
            "(answer with greedy_seq2seq, which takes the uncached path)"
        )
    device, dtype = device_dtype(model)
    k = len(gist_ids)
    batch = padded_prompts(prompts, gist_ids)
    lengths = batch["attention_mask"].sum(-1)
    states, output = _empty_layers(model, len(prompts)), None
    if mask == "gist" and k:  # neg_control keeps nothing: skipped on every rank alike (ZeRO-3 collectives match)
        ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        # no input follows here: the gist rule lets prompt + gist see each other (padding blocked)
        enc_mask = seq2seq_masks(ids, att, gist_ids, "gist", dtype)["attention_mask"]
        out, entering = run_encoder_layers(model, _embed(model, ids, embed), enc_mask, states)
        states, output = [h[:, -k:].clone() for h in entering], out[:, -k:].clone()
    output = states[0][:, :0] if output is None else output
    return Seq2SeqGistCache(states, output, lengths - k, torch.full_like(lengths, output.shape[1]))


@torch.no_grad()
def encode_after_cache(model, cache: Seq2SeqGistCache, inputs: list[list[int]], pad_id: int = 0, embed=None):
    """A request's encoder work alone: its input tokens (right-padded) encoded as queries over
    [cached gist ; input] at every layer. Returns (encoder states [B, k + n, d] = [cached gist outputs ;
    input outputs], cross-attention mask [B, k + n], 1 where the decoder may look)."""
    device, dtype = device_dtype(model)
    batch = pad_batch([{"input_ids": list(t)} for t in inputs], pad_id=pad_id)
    ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    B, n = ids.shape
    k = cache.output.shape[1]
    visible = torch.cat([torch.ones(B, k, dtype=torch.bool, device=device), att.bool()], 1)  # [B, k + n]
    itself = torch.arange(k + n, device=device) == k + torch.arange(n, device=device)[:, None]  # [n, k + n]
    mask = _additive(visible[:, None, None, :] | itself, dtype)  # a padded query sees itself: no empty row
    out, _ = run_encoder_layers(model, _embed(model, ids, embed), mask, [s.to(device) for s in cache.states])
    return torch.cat([cache.output.to(device), out], 1), visible.long()


@torch.no_grad()
def encode_full(model, prompts: list[list[int]], inputs: list[list[int]], gist_ids: list[int], mask: str, embed=None):
    """The masked uncached path: prompt + gist + input (right-padded) through HF's encoder under the
    seq2seq mask. Returns (encoder states [B, S, d], cross-attention mask [B, S])."""
    device, dtype = device_dtype(model)
    batch = pad_batch([{"input_ids": list(p) + list(t)} for p, t in zip(prompts, inputs)], pad_id=0)
    ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    masks = seq2seq_masks(ids, att, gist_ids, mask, dtype)
    states = model.get_encoder()(inputs_embeds=_embed(model, ids, embed), attention_mask=masks["attention_mask"])
    return states.last_hidden_state, cross_keys(ids, att, gist_ids, mask).long()


def _encoder_outputs(states):
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=states)


@torch.no_grad()
def decoder_logits(model, states, cross_mask, decoder_input_ids) -> torch.Tensor:
    """[B, T, vocab] teacher-forced decoder logits over given encoder states (no encoder rerun)."""
    return model(
        encoder_outputs=_encoder_outputs(states),
        attention_mask=cross_mask,
        decoder_input_ids=decoder_input_ids,
        use_cache=False,
    ).logits


@torch.no_grad()
def generate_from_encoder(
    model, states, cross_mask, max_new_tokens: int, eos_id: int, pad_id: int = 0, synced_gpus: bool = False
) -> list[list[int]]:
    """Greedy answers (HF generate, decoder KV cache) over encoder states; new ids per row, cut at eos."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        decoder_start_token_id=model.config.decoder_start_token_id,
        use_cache=True,
    )
    out = model.generate(
        encoder_outputs=_encoder_outputs(states),
        attention_mask=cross_mask,
        generation_config=config,
        synced_gpus=synced_gpus,
    )
    return [cut_at_eos(row.tolist(), eos_id) for row in out[:, 1:]]  # column 0: the decoder start


def greedy_seq2seq(
    model, prompts, tails, gist_ids, mask, max_new_tokens, eos_id, pad_id=0, embed=None, synced_gpus=False, prefix=0
):
    """causal.greedy for encoder-decoder models: prompts (ending in the gist ids) cached under
    `mask` (pos_control: encoded whole with each input), answers after each tail. Returns (answers, cache).
    `prefix` must be 0: mask_prefix=visible is refused for T5 at config time."""
    if prefix:
        raise ValueError("mask_prefix=visible is not implemented for encoder-decoder (T5) models")
    if mask == "pos_control":
        states, cross = encode_full(model, prompts, tails, gist_ids, mask, embed)
        lengths = torch.tensor([len(p) for p in prompts])
        cache = Seq2SeqGistCache(_empty_layers(model, len(prompts)), states[:, :0], lengths - len(gist_ids), lengths)
    else:
        cache = build_seq2seq_cache(model, prompts, gist_ids, mask, embed)
        states, cross = encode_after_cache(model, cache, tails, pad_id, embed)
    return generate_from_encoder(model, states, cross, max_new_tokens, eos_id, pad_id, synced_gpus), cache


@torch.no_grad()
def generate_uncached_seq2seq(
    model, prompts, tails, gist_ids, mask: str, max_new_tokens: int, eos_id: int, embed=None
) -> list[list[int]]:
    """Reference: the full masked encoder input, then a decoder rerun over the whole answer every step
    (no gist cache, no decoder KV cache). Slow; for checking the cached path."""
    device, _ = device_dtype(model)
    states, cross = encode_full(model, prompts, tails, gist_ids, mask, embed)
    decoder = torch.full((len(prompts), 1), model.config.decoder_start_token_id, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = decoder_logits(model, states, cross, decoder)[:, -1].argmax(-1)
        decoder = torch.cat([decoder, nxt[:, None]], 1)
        done |= nxt == eos_id
        if done.all():
            break
    return [cut_at_eos(row.tolist(), eos_id) for row in decoder[:, 1:]]
