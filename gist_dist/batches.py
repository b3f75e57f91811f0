"""Deterministic, resumable sharding of examples into per-rank micro-batches.

Each epoch is a seeded permutation; rank r takes every world-th batch-sized slice, and every rank
sees the same number of batches (the tail that does not divide evenly is dropped), so collectives
never wait on a rank that ran out of data. The position is a plain dict for checkpoints.
"""
from __future__ import annotations

import torch


class ShardedBatches:
    def __init__(self, examples: list, batch_size: int, rank: int, world: int, seed: int, shuffle=True):
        if len(examples) < batch_size * world:
            raise ValueError(f"{len(examples)} examples are fewer than one batch per rank "
                             f"({batch_size} x {world} ranks)")
        self.examples, self.batch_size, self.rank, self.world = examples, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self.per_epoch = len(examples) // (batch_size * world)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> list:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
        start = (self.index * self.world + self.rank) * self.batch_size
        self.index += 1
        return [self.examples[i] for i in order[start:start + self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "world": self.world}

    def load_state_dict(self, state: dict):
        """Restore the position; saved at another world size, continue after the same examples
        (rounded down, so a few may be seen twice but none skipped)."""
        self.epoch, self.index = state["epoch"], state["index"]
        saved_world = state.get("world", self.world)
        if saved_world != self.world:
            self.index = min(self.index * saved_world // self.world, self.per_epoch)
