"""objective=finetune: the whole model trains with the LM loss under the run's mask (gist, or a
control). The gist tokens are new vocabulary rows, mean-initialised; with train.gist_lr their input
rows train as a separate parameter at that lr and are written back into the vocabulary on export."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from .. import artifact, dist, zero
from ..atomic import atomic_dir
from ..config import ConfigError
from ..data import IGNORE
from ..tokens import GistEmbedding, init_gist_embeddings
from .base import Method


def label_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label tokens of a batch in row-major order: what `labelled_rows` predicts."""
    return labels[:, 1:][labels[:, 1:] != IGNORE]


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """(hidden states that predict a label, those labels): position t predicts labels[t + 1].
    Only these rows ever reach the LM head: no [B, T, vocab] logits are built."""
    return hidden[:, :-1][labels[:, 1:] != IGNORE], label_targets(labels)


def lm_head_rows(model, hidden_rows: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden_rows)


class CausalLMLoss(nn.Module):
    """forward(batch) -> cross-entropy summed over the batch's label tokens (divided by their count:
    HF's loss, same value).

    With `gist_rows` (train.gist_lr) the gist tokens' input embeddings come from that separate parameter,
    so they can train at their own lr; a tied model also takes the gist ids' output rows from it, so the
    exported model (the rows written into its vocabulary, `with_gist_rows`) computes what was trained."""

    def __init__(self, model, gist_rows: GistEmbedding | None = None):
        super().__init__()
        self.model = model
        self.gist_rows = gist_rows

    def forward(self, input_ids, attention_mask, position_ids, labels):
        tokens = (
            {"input_ids": input_ids}
            if self.gist_rows is None
            else {"inputs_embeds": self.gist_rows(input_ids, self.model.get_input_embeddings())}
        )
        hidden = self.model.get_decoder()(
            **tokens, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        rows, targets = labelled_rows(hidden, labels)
        return F.cross_entropy(self.logits(rows).float(), targets, reduction="sum")

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        logits = lm_head_rows(self.model, rows)
        if self.gist_rows is not None and ties_embeddings(self.model):
            logits = logits.index_copy(-1, self.gist_rows.gist_ids, self.gist_rows(hidden=rows).to(logits.dtype))
        return logits


def ties_embeddings(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def with_gist_rows(model, state: dict, gist_ids: list[int], gist: torch.Tensor) -> dict:
    """`state` (the model's weights) with the trained gist rows written into the input embedding's rows
    of the gist ids; a tied model's output embedding is the same tensor, under its own key too."""
    tables = [model.get_input_embeddings()] + ([model.get_output_embeddings()] if ties_embeddings(model) else [])
    keys = [name + ".weight" for name, m in model.named_modules() if any(m is t for t in tables)]
    weight = state[keys[0]].clone()
    weight[gist_ids] = gist.to(weight.device, weight.dtype)
    return {**state, **{key: weight for key in keys if key in state}}


class Finetune(Method):
    name = "finetune"
    loss_module = CausalLMLoss  # what wraps the model (the encoder-decoder family swaps it)

    @classmethod
    def check(cls, cfg):
        # here, not in RunConfig.validate: compress loads a fine-tune config and makes it distill afterwards
        if cfg.distill.params != "embeddings":
            raise ConfigError(
                f"distill.params={cfg.distill.params} is for objective=distill (fine-tuning trains every layer already)"
            )

    def encode(self, template, records, stats, split):
        self.prefix = len(template.fixed_head) if self.cfg.mask_prefix == "visible" else 0
        return template.encode_all(records, stats)

    def collate(self, examples, device):
        inputs, labels = self.model_batch(examples, self.cfg.mask, device)
        return {**inputs, "labels": labels}, sum(len(e["input_ids"]) for e in examples)

    def wrap(self, model):
        tok, ids = self.tokens.tokenizer, self.tokens.gist_ids
        init_gist_embeddings(model, ids, self.tokens.num_old, len(tok), zero.gather)
        model.config.use_cache = False
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.cfg.train.gist_lr:
            return self.loss_module(model), trainable
        embedding = model.get_input_embeddings().weight
        with zero.gather([embedding]):
            gist_rows = GistEmbedding(ids, embedding[ids].detach().clone())  # starts where the vocabulary rows do
        module = self.loss_module(model, gist_rows)
        return module, trainable + [gist_rows.gist]

    def param_groups(self, module, trainable):
        gist_rows = getattr(module, "gist_rows", None)
        if gist_rows is None:
            return super().param_groups(module, trainable)
        return [
            {"params": [p for p in trainable if p is not gist_rows.gist]},
            {"params": [gist_rows.gist], "lr": self.cfg.train.gist_lr},
        ]

    def export(self, engine, module, out, meta, last_loss):
        """OUTPUT_DIR/final/: a plain HF folder (safetensors + tokenizer + gist_model.json + model card)."""
        state = zero.consolidated_state_dict(engine, prefix="model.")  # rank 0 holds it under ZeRO-3
        gist_rows = getattr(module, "gist_rows", None)
        if gist_rows is not None:
            with zero.gather([gist_rows.gist]):  # every rank takes part in the gather
                gist = gist_rows.gist.detach().clone()
        if not dist.is_main():
            return
        if gist_rows is not None:
            state = with_gist_rows(module.model, state, self.tokens.gist_ids, gist)
        tok, cfg = self.tokens.tokenizer, self.cfg
        gist_tokens = tok.convert_ids_to_tokens(self.tokens.gist_ids)
        with atomic_dir(out / "final") as tmp:
            module.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / artifact.FINAL_META).write_text(
                json.dumps(
                    {
                        "mask": cfg.mask,
                        "num_gist": cfg.num_gist,
                        "gist_tokens": gist_tokens,
                        "mask_prefix_tokens": self.prefix,
                    },
                    indent=2,
                )
            )
            (tmp / "README.md").write_text(self.model_card(cfg, gist_tokens))

    @staticmethod
    def model_card(cfg, gist_tokens: list[str]) -> str:
        return model_card(cfg, gist_tokens)


TEMPLATE_TEXT = {  # data.template -> (the layout, the part run once into the cache, the rest), given the gist text
    "alpaca": lambda gist: (
        f"    Instruction: {{instruction}}\\n{gist}\\nInput: {{input}}\\nOutput: {{output}}<eos>\n\n"
        "(`\\nInput: {input}` is left out when there is no input.)",
        f"`Instruction: ...\\n{gist}`",
        "`\\nInput: ...\\nOutput:`",
    ),
    "chat": lambda gist: (
        "The tokenizer's own chat template: one user turn `{instruction}" + gist + "\\n{input}` (no `\\n` "
        "without an input), the assistant turn `{output}` with its end-of-turn tokens.",
        f"the chat template up to the user turn's `{{instruction}}{gist}`",
        "the rest of the user turn and the assistant header",
    ),
    "chat_system": lambda gist: (
        "The tokenizer's own chat template: the system message `{instruction}" + gist + "`, the "
        "user turn `{input}`, the assistant turn `{output}` with its end-of-turn tokens.",
        f"the chat template up to the system message's `{{instruction}}{gist}`",
        "the rest: the user turn and the assistant header",
    ),
}


def model_card(cfg, gist_tokens: list[str]) -> str:
    """final/README.md: what the gist tokens are and how to use the cached path with transformers alone."""
    gist = "".join(gist_tokens)
    keep = {
        "gist": f"Keep only the last {cfg.num_gist} entries of every layer's keys/values (the gist tokens)",
        "pos_control": "Keep every entry (pos_control masks nothing: the control, not a compressed model)",
        "neg_control": "Keep no entry (neg_control hides the prompt and the gist: the floor control)",
    }[cfg.mask]
    if cfg.mask_prefix == "visible" and cfg.mask != "pos_control":  # trained with the fixed head visible
        keep += (
            ", and in front of them the first `mask_prefix_tokens` entries (gist_model.json: the fixed "
            "template head, the same for every instruction)"
        )
    template, prompt_part, rest = TEMPLATE_TEXT[cfg.data.template](gist)
    return f"""# Gist model ({cfg.mask}, {cfg.num_gist} gist token(s))

Trained by gist-dist from `{cfg.model.name}`. The tokenizer has the gist tokens `{gist}` as special tokens.

Template (`data.template={cfg.data.template}`, labels only on the output):

{template}

Under the `{cfg.mask}` mask, tokens after the gist cannot see the instruction, so only the gist
tokens' keys/values need to be kept.

Cached path with transformers alone:
1. Run {prompt_part} once with `use_cache=True`, positions 0..n-1.
2. {keep}; put them in a `DynamicCache`.
3. Generate from {rest} with that cache, `attention_mask` of ones over
   gist + new tokens, and `position_ids` starting at n (where the instruction + gist ended).
The answers equal those of the full sequence under the gist mask (`gist-dist eval` checks this path).
"""
