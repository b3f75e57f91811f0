"""The encoder-decoder family (T5, FLAN-T5: the paper's second case): both objectives, with the prompt,
gist and input in the encoder and the answer in the decoder.

Examples come from the same GistTemplate as for decoder-only models (truncation counted, the data
cache), as one sequence: head (prompt + gist + input; labels IGNORE) + answer + eos, bounded by
data.max_length in all. A batch splits it: the encoder reads the head under the encoder gist mask
(seq2seq_masks); the decoder reads [decoder start] + answer with labels [IGNORE] + answer, so hidden
state t predicts label t + 1 as in a causal LM and finetune's logit-light rows, distill's KL, teacher
cache, frozen-weight digests and artifact serve unchanged (the decoder also reads the final eos,
whose prediction is never used: one position more than needed).

HF's T5ForConditionalGeneration.forward gives its `attention_mask` to the encoder and to the
cross-attention alike, so the encoder and the decoder are called here, each with its own mask.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data import IGNORE
from ..seq2seq_masks import seq2seq_masks
from .base import to_device
from .distill import Distill, DistillLoss
from .finetune import Finetune, labelled_rows


def split(example: dict, start_id: int) -> tuple[dict, dict]:
    """A template example (head + answer) -> (encoder example, decoder example)."""
    head = list(example["labels"]).count(IGNORE)  # IGNORE over the head only, then the answer
    answer = list(example["input_ids"][head:])
    return {"input_ids": list(example["input_ids"][:head])}, {
        "input_ids": [start_id] + answer,
        "labels": [IGNORE] + answer,
    }


def decoder_states(
    model, attention_mask, encoder_attention_mask, decoder_input_ids, input_ids=None, inputs_embeds=None
):
    """The decoder's last hidden states: the encoder under its mask, cross-attention under its own."""
    encoded = model.get_encoder()(
        input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
    ).last_hidden_state
    return model.get_decoder()(
        input_ids=decoder_input_ids,
        encoder_hidden_states=encoded,
        encoder_attention_mask=encoder_attention_mask,
        use_cache=False,
    ).last_hidden_state


def head_rows(model, rows):
    """The LM head on decoder rows; original T5 (v1.0) scales them by d_model^-0.5 first, as HF's forward does."""
    if getattr(model.config, "scale_decoder_outputs", False):
        rows = rows * model.config.d_model**-0.5
    return model.get_output_embeddings()(rows)


class Seq2SeqLMLoss(nn.Module):
    """forward(batch) -> cross-entropy summed over the answer tokens (LM head on those rows only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, labels, **inputs):
        rows, targets = labelled_rows(decoder_states(self.model, **inputs), labels)
        return F.cross_entropy(head_rows(self.model, rows).float(), targets, reduction="sum")


class Seq2SeqDistillLoss(DistillLoss):
    """DistillLoss (frozen model, gist rows spliced into the encoder input) through encoder + decoder."""

    def response_logits(self, labels, **inputs):
        return head_rows(self.model, labelled_rows(decoder_states(self.model, **inputs), labels)[0])


class Seq2Seq:
    """What both objectives do differently for encoder-decoder models: the batch and the refusals."""

    flex_attention = False

    @classmethod
    def check(cls, cfg):
        # T5's relative position bias spans every (query, key) pair of a row: one dense [S, S] bias
        if cfg.data.packing:
            raise ConfigError(
                "data.packing is not supported for encoder-decoder (T5) models: their relative "
                "position bias is dense over the whole row; set data.packing=false"
            )
        if cfg.mask_prefix != "hidden":
            raise ConfigError(
                "mask_prefix=visible is not implemented for encoder-decoder (T5) models; set mask_prefix=hidden"
            )
        if cfg.train.gist_lr:
            raise ConfigError("train.gist_lr is not implemented for encoder-decoder (T5) models; unset it")
        if cfg.model.attention == "flex":
            raise ConfigError(
                "model.attention=flex is not supported for encoder-decoder (T5) models: their "
                "relative position bias needs the dense mask; use model.attention=dense or auto"
            )
        if cfg.distill.params != "embeddings":
            raise ConfigError(
                f"distill.params={cfg.distill.params} needs a decoder-only model; it is not implemented for "
                "encoder-decoder (T5) models"
            )

    def wrap(self, model):
        self.start_id = model.config.decoder_start_token_id
        return super().wrap(model)

    def model_batch(self, examples, mask, device):
        """(encoder ids, encoder + cross-attention gist masks, decoder input ids; decoder labels)."""
        enc, dec = zip(*(split(e, self.start_id) for e in examples))
        e = to_device(list(enc), self.tokens.pad_id, device)
        d = to_device(list(dec), self.tokens.pad_id, device)  # right-padded: the causal decoder never sees it
        masks = seq2seq_masks(e["input_ids"], e["attention_mask"], self.tokens.gist_ids, mask, self.dtype)
        return {"input_ids": e["input_ids"], **masks, "decoder_input_ids": d["input_ids"]}, d["labels"]


class Seq2SeqFinetune(Seq2Seq, Finetune):
    loss_module = Seq2SeqLMLoss

    @staticmethod
    def model_card(cfg, gist_tokens: list[str]) -> str:
        return model_card(cfg, gist_tokens)


class Seq2SeqDistill(Seq2Seq, Distill):
    loss_module = Seq2SeqDistillLoss


def model_card(cfg, gist_tokens: list[str]) -> str:
    """final/README.md of an encoder-decoder gist model."""
    gist = "".join(gist_tokens)
    return f"""# Gist encoder-decoder model ({cfg.mask}, {cfg.num_gist} gist token(s))

Trained by gist-dist from `{cfg.model.name}`. The tokenizer has the gist tokens `{gist}` as special tokens.

Encoder input: `Instruction: {{instruction}}\\n{gist}\\nInput: {{input}}\\nOutput:` (`\\nInput: {{input}}` is
left out when there is no input); decoder: `decoder_start_token_id`, then ` {{output}}<eos>` (the labels).

Under the `gist` mask the instruction and gist tokens see only each other in the encoder, the input tokens
see only the gist and the input, and the decoder's cross-attention reaches only the gist and the input:
the instruction reaches the answer only through the gist positions (`gist_dist.seq2seq_masks`).
This model was trained under `{cfg.mask}`.

With transformers alone, give the two masks separately (T5's forward would use one for both):
`enc = model.encoder(input_ids=ids, attention_mask=encoder_mask)`, then
`model(encoder_outputs=enc, attention_mask=cross_mask, decoder_input_ids=...)`, where the masks are
`gist_dist.seq2seq_masks.seq2seq_masks(...)`'s `attention_mask` and `encoder_attention_mask`.
"""
