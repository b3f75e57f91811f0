"""Packing: several examples share one row of up to data.max_length tokens (data.packing=true).

Rows are filled best-fit decreasing: examples sorted longest first, each put into the row with the
least room that still fits it (a sorted list of free space, so O(n log n)). It packs tighter than
first-fit in arrival order, is deterministic (the same rows on every rank and every resume, so the
loader position in a checkpoint stays valid), and rows are shuffled by the batcher like examples.
Inside a row, masks.py keeps every example to itself (its own gist rule, positions from 0), and the
labels are each example's own, so every token's loss is what it would be unpacked.
"""

from __future__ import annotations

import bisect


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows whose lengths sum to <= capacity (each length <= capacity)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - n, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= n
        bisect.insort(free, (room, row))
    return rows


def join(parts: list[dict]) -> dict:
    """One packed row: ids and labels end to end, and each example's length (its segment)."""
    return {
        "input_ids": [t for p in parts for t in p["input_ids"]],
        "labels": [t for p in parts for t in p["labels"]],
        "lengths": [len(p["input_ids"]) for p in parts],
    }


def pack(examples, capacity: int, length, combine) -> list:
    """Rows of `examples`: `length(example)` is what must fit, `combine(list of examples)` the row."""
    rows = best_fit([length(e) for e in examples], capacity)
    return [combine([examples[i] for i in sorted(row)]) for row in rows]
