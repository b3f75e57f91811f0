"""What every training objective provides to the Trainer; the loop never names an objective.

A method says how records become examples, how examples become a batch on the engine's device,
which module the engine trains (and what stays frozen), what a checkpoint keeps, and what the
run exports. The module's forward(**batch) returns the loss: the loop only calls it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batches import ShardedBatches
from ..config import RunConfig
from ..data import pad_batch


@dataclass
class Tokens:
    """What the tokenizer set-up tells a method: gist ids, vocabulary sizes before/after, padding."""
    tokenizer: object
    gist_ids: list[int]
    num_old: int  # vocabulary size before the gist tokens were added
    pad_id: int


def to_device(examples: list[dict], pad_id: int, device: torch.device) -> dict:
    """Padded ids/labels, moved to the engine's device (pinned and non-blocking on GPUs), so the 4D
    mask is then built there, never copied over."""
    batch = pad_batch(examples, pad_id)
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


class Method:
    name = ""
    trains_backbone = True  # False: checkpoints leave the (frozen) backbone's shards out

    def __init__(self, cfg: RunConfig, tokens: Tokens, dtype: torch.dtype):
        self.cfg, self.tokens, self.dtype = cfg, tokens, dtype

    def encode(self, template, records, stats, split: str) -> list:
        """Records -> examples (`stats` counts truncation/drops; None for eval)."""
        raise NotImplementedError

    def batches(self, examples: list, batch_size: int, rank: int, world: int, seed: int) -> ShardedBatches:
        return ShardedBatches(examples, batch_size, rank, world, seed)

    def collate(self, examples: list, device: torch.device) -> tuple[dict, int]:
        """(kwargs for the module's forward, tokens in the batch counted on the host: no device sync)."""
        raise NotImplementedError

    def wrap(self, model) -> tuple[torch.nn.Module, list]:
        """(the module the engine trains, the parameters the optimizer updates)."""
        raise NotImplementedError

    def start(self, module) -> dict:
        """Before the first step (fresh runs and resumes): facts for the run's records."""
        return {}

    def finish(self, module, meta: dict) -> dict:
        """After the last step: checks and facts for the end record."""
        return {}

    def export(self, engine, module, out, meta: dict, last_loss):
        raise NotImplementedError
