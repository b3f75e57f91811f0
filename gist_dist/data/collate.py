"""Collation: examples of different lengths padded into one batch."""

from __future__ import annotations

import torch

from .examples import IGNORE


def pad_batch(examples: list[dict], pad_id: int, left: bool = False) -> dict:
    """Pad to the longest example. Returns input_ids, attention_mask, labels (2D)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids, att, lab = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = T - n
        labels = e.get("labels", [IGNORE] * n)
        if left:
            ids.append([pad_id] * pad + e["input_ids"])
            att.append([0] * pad + [1] * n)
            lab.append([IGNORE] * pad + labels)
        else:
            ids.append(e["input_ids"] + [pad_id] * pad)
            att.append([1] * n + [0] * pad)
            lab.append(labels + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(att), "labels": torch.tensor(lab)}
