"""Encoded examples: ids and labels (IGNORE over the prompt, gist and tail; the answer's ids after),
stored compactly as flat int32 arrays."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np

IGNORE = -100


class ListLike(Sequence):
    """A read-only sequence that compares equal to a list with the same items."""

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self):
        return f"<{type(self).__name__} of {len(self)}>"


class Examples(ListLike):
    """Encoded examples as flat int32 arrays, 4 bytes a token (a list of Python ints costs ~40).
    Example i is ids[starts[i]:starts[i+1]]; its labels are IGNORE over the first heads[i] tokens
    (prompt, gist, tail), then the ids themselves (the answer), exactly as GistTemplate.encode
    builds them. Indexing gives encode()'s dict; slicing gives a view."""

    ARRAYS = ("ids", "starts", "heads", "prompts")

    def __init__(self, ids, starts, heads, prompts, index=None):
        self.ids, self.starts, self.heads, self.prompts, self.index = ids, starts, heads, prompts, index

    @classmethod
    def pack(cls, examples) -> Examples:
        """Examples from encode()-style dicts whose labels are IGNORE, then the ids (checked)."""
        ids, starts, heads, prompts = array("i"), array("q", [0]), array("i"), array("i")
        for ex in examples:
            head = sum(lab == IGNORE for lab in ex["labels"])
            if ex["labels"][head:] != ex["input_ids"][head:] or len(ex["labels"]) != len(ex["input_ids"]):
                raise ValueError("Examples.pack: labels must be IGNORE over a head, then the input ids")
            ids.extend(ex["input_ids"])
            starts.append(len(ids))
            heads.append(head)
            prompts.append(ex["prompt_tokens"])
        return cls(*(np.frombuffer(a, dtype=a.typecode) for a in (ids, starts, heads, prompts)))

    def __len__(self):
        return len(self.heads) if self.index is None else len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            index = np.arange(len(self))[i] if self.index is None else self.index[i]
            return Examples(self.ids, self.starts, self.heads, self.prompts, index)
        j = range(len(self))[i] if self.index is None else int(self.index[i])
        ids = self.ids[self.starts[j] : self.starts[j + 1]].tolist()
        head = int(self.heads[j])
        return {"input_ids": ids, "labels": [IGNORE] * head + ids[head:], "prompt_tokens": int(self.prompts[j])}

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.ARRAYS)
