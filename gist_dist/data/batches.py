"""Deterministic, resumable sharding of examples into per-rank micro-batches.

Each epoch lays the examples out in one order (a seeded permutation); rank r's j-th batch is the
slice at (j * world + r) * batch_size, so every rank sees the same number of batches (the tail that
does not divide evenly is dropped for that epoch; the next epoch's order differs), and collectives
never wait on a rank that ran out of data.

`pinned=True` keeps each example on one rank for good (shuffled within the rank each epoch), for a
per-rank teacher cache: the epoch's order then interleaves the ranks' own permutations.

Position = (epoch, examples of this epoch consumed before this world size took over, batches per
rank since). Resumed at another world size, the new ranks split the rest of the same epoch's order,
so no example is repeated or skipped.
"""

from __future__ import annotations

import torch


class ShardedBatches:
    def __init__(self, examples, batch_size: int, rank: int, world: int, seed: int, shuffle=True, pinned=False):
        if len(examples) < batch_size * world:
            raise ValueError(
                f"{len(examples)} examples are fewer than one batch per rank ({batch_size} x {world} ranks)"
            )
        self.examples, self.batch_size, self.rank, self.world = examples, batch_size, rank, world
        self.seed, self.shuffle, self.pinned = seed, shuffle, pinned
        self.epoch, self.index, self.offset, self.epoch_world = 0, 0, 0, world
        self._cached = None

    def _perm(self, n: int, salt: int) -> list[int]:
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch * 7919 + salt)
        return torch.randperm(n, generator=g).tolist()

    def _order(self) -> list[int]:
        """The epoch's example order, laid out for the world size that started the epoch."""
        if self._cached and self._cached[0] == (self.epoch, self.epoch_world):
            return self._cached[1]
        n, w, bs = len(self.examples), self.epoch_world, self.batch_size
        if not self.pinned:
            order = self._perm(n, 0)
        else:
            owned = [list(range(r, n, w)) for r in range(w)]
            perms = [[mine[i] for i in self._perm(len(mine), r + 1)] for r, mine in enumerate(owned)]
            per_rank = min(len(p) for p in perms) // bs
            order = [i for j in range(per_rank) for p in perms for i in p[j * bs : (j + 1) * bs]]
        self._cached = ((self.epoch, self.epoch_world), order)
        return order

    @property
    def per_epoch(self) -> int:
        """Batches per rank left in this epoch from the current offset (a whole epoch when fresh)."""
        return (len(self._order()) - self.offset) // (self.batch_size * self.world)

    def __iter__(self):
        return self

    def __next__(self) -> list:
        while self.index >= self.per_epoch:
            self.epoch, self.index, self.offset, self.epoch_world = self.epoch + 1, 0, 0, self.world
        start = self.offset + (self.index * self.world + self.rank) * self.batch_size
        self.index += 1
        return [self.examples[i] for i in self._order()[start : start + self.batch_size]]

    def rewind(self):
        """Back to the start of epoch 0 (eval batches are re-read from the top)."""
        self.epoch, self.index, self.offset, self.epoch_world = 0, 0, 0, self.world

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "world": self.world,
            "offset": self.offset,
            "epoch_world": self.epoch_world,
        }

    def load_state_dict(self, state: dict):
        self.epoch, self.index = state["epoch"], state["index"]
        saved_world = state.get("world", self.world)
        self.offset = state.get("offset", 0)
        self.epoch_world = state.get("epoch_world", saved_world)
        if saved_world != self.world:  # the new ranks split what the old ones left of this epoch
            self.offset += self.index * saved_world * self.batch_size
            self.index = 0
