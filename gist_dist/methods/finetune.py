"""objective=finetune: the whole model trains with the LM loss under the run's mask (gist, or a
control). The gist tokens are new vocabulary rows, mean-initialised."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist, zero
from ..atomic import atomic_dir
from ..data import IGNORE
from ..tokens import init_gist_embeddings
from .base import Method

FINAL_META = "gist_model.json"  # final/: which gist tokens and mask (the distill artifact has gist_config.json)


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
    HF's loss, same value)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, labels):
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False).last_hidden_state
        rows, targets = labelled_rows(hidden, labels)
        return F.cross_entropy(lm_head_rows(self.model, rows).float(), targets, reduction="sum")


class Finetune(Method):
    name = "finetune"
    loss_module = CausalLMLoss  # what wraps the model (the encoder-decoder family swaps it)

    def encode(self, template, records, stats, split):
        self.prefix = len(template.fixed_head) if self.cfg.mask_prefix == "visible" else 0
        return template.encode_all(records, stats)

    def collate(self, examples, device):
        inputs, labels = self.model_batch(examples, self.cfg.mask, device)
        return {**inputs, "labels": labels}, sum(len(e["input_ids"]) for e in examples)

    def wrap(self, model):
        tok = self.tokens.tokenizer
        init_gist_embeddings(model, self.tokens.gist_ids, self.tokens.num_old, len(tok), zero.gather)
        model.config.use_cache = False
        return self.loss_module(model), [p for p in model.parameters() if p.requires_grad]

    def export(self, engine, module, out, meta, last_loss):
        """OUTPUT_DIR/final/: a plain HF folder (safetensors + tokenizer + gist_model.json + model card)."""
        state = zero.consolidated_state_dict(engine, prefix="model.")  # rank 0 holds it under ZeRO-3
        if not dist.is_main():
            return
        tok, cfg = self.tokens.tokenizer, self.cfg
        gist_tokens = tok.convert_ids_to_tokens(self.tokens.gist_ids)
        with atomic_dir(out / "final") as tmp:
            module.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / FINAL_META).write_text(json.dumps(
                {"mask": cfg.mask, "mode": cfg.mask, "num_gist": cfg.num_gist, "gist_tokens": gist_tokens,
                 "mask_prefix_tokens": self.prefix}, indent=2))
            (tmp / "README.md").write_text(self.model_card(cfg, gist_tokens))

    @staticmethod
    def model_card(cfg, gist_tokens: list[str]) -> str:
        return model_card(cfg, gist_tokens)


TEMPLATE_TEXT = {  # data.template -> (the layout, the part run once into the cache, the rest), given the gist text
    "alpaca": lambda gist: (f"    Instruction: {{instruction}}\\n{gist}\\nInput: {{input}}\\nOutput: {{output}}<eos>\n\n"
                            "(`\\nInput: {input}` is left out when there is no input.)",
                            f"`Instruction: ...\\n{gist}`", "`\\nInput: ...\\nOutput:`"),
    "chat": lambda gist: ("The tokenizer's own chat template: one user turn `{instruction}" + gist + "\\n{input}` (no `\\n` "
                          "without an input), the assistant turn `{output}` with its end-of-turn tokens.",
                          f"the chat template up to the user turn's `{{instruction}}{gist}`",
                          "the rest of the user turn and the assistant header"),
    "chat_system": lambda gist: ("The tokenizer's own chat template: the system message `{instruction}" + gist + "`, the "
                                 "user turn `{input}`, the assistant turn `{output}` with its end-of-turn tokens.",
                                 f"the chat template up to the system message's `{{instruction}}{gist}`",
                                 "the rest: the user turn and the assistant header"),
}


def model_card(cfg, gist_tokens: list[str]) -> str:
    """final/README.md: what the gist tokens are and how to use the cached path with transformers alone."""
    gist = "".join(gist_tokens)
    keep = {"gist": f"Keep only the last {cfg.num_gist} entries of every layer's keys/values (the gist tokens)",
            "pos_control": "Keep every entry (pos_control masks nothing: the control, not a compressed model)",
            "neg_control": "Keep no entry (neg_control hides the prompt and the gist: the floor control)"}[cfg.mask]
    if cfg.mask_prefix == "visible" and cfg.mask != "pos_control":  # trained with the fixed head visible
        keep += (", and in front of them the first `mask_prefix_tokens` entries (gist_model.json: the fixed "
                 "template head, the same for every instruction)")
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
