"""What every training objective provides to the Trainer; the loop never names an objective.

A method says how records become examples, how examples become a batch on the engine's device,
which module the engine trains (and what stays frozen), what a checkpoint keeps, and what the
run exports. The module's forward(**batch) returns the loss: the loop only calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..data import IGNORE, pad_batch
from ..data.batches import ShardedBatches
from ..data.packing import join, pack
from ..masks import model_inputs


@dataclass
class Tokens:
    """What the tokenizer set-up tells a method: gist ids, vocabulary sizes before/after, padding."""

    tokenizer: object
    gist_ids: list[int]
    num_old: int  # vocabulary size before the gist tokens were added
    pad_id: int


def segment_ids(examples: list[dict], width: int) -> torch.Tensor:
    """[B, width]: each token's example within its row (0, 1, ... for packed rows), -1 on padding."""
    rows = []
    for e in examples:
        lengths = e.get("lengths") or [len(e["input_ids"])]
        row = [s for s, n in enumerate(lengths) for _ in range(n)]
        rows.append(row + [-1] * (width - len(row)))
    return torch.tensor(rows)


def label_tokens(example: dict) -> int:
    """Tokens whose prediction is scored: labelled positions after the first (t predicts t + 1)."""
    return sum(label != IGNORE for label in example["labels"][1:])


def to_device(examples: list[dict], pad_id: int, device: torch.device) -> dict:
    """Padded ids/labels and segment ids, moved to the engine's device (pinned and non-blocking on
    GPUs), so the mask is then built there, never copied over."""
    batch = pad_batch(examples, pad_id)
    batch["segments"] = segment_ids(examples, batch["input_ids"].shape[1])
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


class Method:
    """The module from `wrap` returns the loss SUMMED over the batch's target tokens; the Trainer
    divides by the target tokens of the whole global batch (all micro-batches, all ranks), so the
    loss and its gradient do not depend on how examples were grouped into micro-batches or rows."""

    name = ""
    trains_backbone = True  # False: checkpoints leave the (frozen) backbone's shards out
    flex_attention = True  # can take the mask as a FlexAttention BlockMask (model.attention=auto picks it on CUDA)

    @classmethod
    def check(cls, cfg: RunConfig):
        """Refuse settings this method cannot honour (ConfigError), before anything is built."""

    def __init__(self, cfg: RunConfig, tokens: Tokens, dtype: torch.dtype, attention: str = "dense"):
        self.cfg, self.tokens, self.dtype = cfg, tokens, dtype
        self.attention = attention  # dense (4D float mask) | flex (BlockMask)
        self.prefix = 0  # leading template tokens every query sees (mask_prefix=visible; set by encode)

    def encode(self, template, records, stats, split: str) -> list:
        """Records -> examples (`stats` counts truncation/drops; None for eval)."""
        raise NotImplementedError

    def pack(self, examples, capacity: int) -> list:
        """Rows of several examples, each row at most `capacity` tokens (data.packing)."""
        return pack(examples, capacity, lambda e: len(e["input_ids"]), join)

    def targets(self, examples: list) -> int:
        """Target tokens in these examples (what the loss is summed over)."""
        return sum(label_tokens(e) for e in examples)

    def batches(self, examples: list, batch_size: int, rank: int, world: int, seed: int) -> ShardedBatches:
        return ShardedBatches(examples, batch_size, rank, world, seed)

    def collate(self, examples: list, device: torch.device) -> tuple[dict, int]:
        """(kwargs for the module's forward, tokens in the batch counted on the host: no device sync)."""
        raise NotImplementedError

    def model_batch(self, examples: list, mask: str, device: torch.device) -> tuple[dict, torch.Tensor]:
        """(the model's inputs under `mask`, the labels) on `device`: for a causal LM the ids, the gist
        mask (dense 4D or a BlockMask) and positions; the encoder-decoder family has its own."""
        b = to_device(examples, self.tokens.pad_id, device)
        return model_inputs(b, self.tokens.gist_ids, mask, self.dtype, self.attention, self.prefix), b["labels"]

    def wrap(self, model) -> tuple[torch.nn.Module, list]:
        """(the module the engine trains, the parameters the optimizer updates)."""
        raise NotImplementedError

    def param_groups(self, module, trainable: list) -> list[dict]:
        """The optimizer's parameter groups (a group without "lr" takes train.lr)."""
        return [{"params": trainable}]

    def start(self, module) -> dict:
        """Before the first step (fresh runs and resumes): facts for the run's records."""
        return {}

    def finish(self, module, meta: dict) -> dict:
        """After the last step: checks and facts for the end record."""
        return {}

    def export(self, engine, module, out, meta: dict, last_loss):
        raise NotImplementedError
