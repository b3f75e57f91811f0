"""Records -> token ids in a gist template (data.template; the instruction is compressed, the input
stays visible):

    alpaca       the paper's layout:
                 Instruction: {instruction}\n<GIST_0>...<GIST_{k-1}>\nInput: {input}\nOutput: {output}<eos>
    chat         the tokenizer's own chat template: the user turn is the instruction, the gist tokens,
                 then "\n" + the input; the answer is the assistant turn (labels: answer + end of turn)
    chat_system  the tokenizer's chat template with the instruction + gist as the system message and
                 the input as the user turn (`gist-dist compress`: the prompt is a system prompt)

User text is tokenized with `split_special_tokens=True`, and gist ids are inserted as ids, so text
like "<GIST_0>" or "<|im_start|>" inside data can never become a special token.
"""

from __future__ import annotations

import hashlib
import inspect

import numpy as np

from ..config import TEMPLATES
from .cache import CACHE_VERSION, Records, cached
from .examples import IGNORE, Examples
from .records import DataError, DataStats


def sequence_start(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself puts one first (the model was trained with it: LLaMA-1/2/3,
    Mistral), else []. SmolLM2 defines bos `<|im_start|>` but never adds it (add_bos_token False)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


_SLOTS = ("[[gist-dist:instruction]]", "[[gist-dist:input]]", "[[gist-dist:output]]")


def chat_segments(tokenizer, layout: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """The fixed ids of the tokenizer's chat template around the instruction, input and answer:
    (before the instruction, between the gist and the input, between the input and the answer,
    the end of the answer's turn: up to and including eos)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.template={layout}: the tokenizer has no chat template (use data.template=alpaca)")
    instruction, inp, output = _SLOTS
    turns = (
        [{"role": "system", "content": instruction}, {"role": "user", "content": inp}]
        if layout == "chat_system"
        else [{"role": "user", "content": instruction + inp}]
    )
    text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": output}], tokenize=False)
    parts = []
    for slot in _SLOTS:
        if text.count(slot) != 1:
            raise DataError(f"data.template={layout}: the tokenizer's chat template does not keep message text as is")
        before, text = text.split(slot)
        parts.append(before)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in parts + [text]]  # template text: specials stay
    eos = tokenizer.eos_token_id
    end = ids[3][: ids[3].index(eos) + 1] if eos in ids[3] else [eos]
    return ids[0], ids[1], ids[2], end


class GistTemplate:
    """Tokenizes records into the gist template. One instance per (tokenizer, gist ids, template)."""

    def __init__(
        self, tokenizer, gist_ids: list[int], max_length: int, overlong: str = "truncate", template: str = "alpaca"
    ):
        if template not in TEMPLATES:
            raise DataError(f"data.template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        self.tok = tokenizer
        self.gist_ids = list(gist_ids)
        self.max_length = max_length
        self.overlong = overlong
        self.template = template
        self.eos = tokenizer.eos_token_id
        self.bos = sequence_start(tokenizer)
        self.chat = chat_segments(tokenizer, template) if template != "alpaca" else None
        # what stays before the gist when the prompt is left out: the BOS, or the chat header
        self.prefix = self.chat[0] if self.chat else self.bos
        # the prompt's leading tokens that are the same for every record (mask_prefix=visible keeps them
        # visible); the instruction is tokenized after them (the same ids as the joined text on SmolLM2)
        self.fixed_head = self.chat[0] if self.chat else self.bos + self.text_ids("Instruction:")

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    def pieces(self, rec: dict):
        """(prefix + instruction, the tail up to the answer, the answer + end of turn) as token ids."""
        if self.chat:
            head, between, before_answer, end = self.chat
            sep = "\n" if self.template == "chat" and rec.get("input") else ""
            tail = between + self.text_ids(sep + (rec.get("input") or "")) + before_answer
            return head + self.text_ids(rec["instruction"]), tail, self.text_ids(rec["output"]) + end
        prompt = self.fixed_head + self.text_ids(f" {rec['instruction']}\n")
        tail = f"\nInput: {rec['input']}\nOutput:" if rec.get("input") else "\nOutput:"
        return prompt, self.text_ids(tail), self.text_ids(" " + rec["output"]) + [self.eos]

    def encode(
        self,
        rec: dict,
        stats: DataStats | None = None,
        *,
        with_gist: bool = True,
        with_prompt: bool = True,
        with_output: bool = True,
    ) -> dict | None:
        """One example. Returns None if it must be dropped (overlong and overlong=drop). Without the
        prompt the sequence still starts with the prefix (the BOS when the model takes one; the chat header)."""
        prompt, tail, output = self.pieces(rec)
        head = (prompt if with_prompt else self.prefix) + (self.gist_ids if with_gist else []) + tail
        output = output if with_output else []
        if len(head) + len(output) > self.max_length:
            if self.overlong == "drop" or len(head) >= self.max_length:
                if stats is not None:
                    stats.dropped_overlong += 1
                return None
            output = output[: self.max_length - len(head)]
            if stats is not None:
                stats.truncated += 1
        return {
            "input_ids": head + output,
            "labels": [IGNORE] * len(head) + output,
            "prompt_tokens": len(prompt),
        }

    def encode_all(self, records, stats: DataStats | None = None, **kw) -> Examples:
        """Every record's example (dropped ones counted in `stats`), stored compactly. Records from
        a cached source are encoded once (first process) into memory-mapped arrays in the cache,
        keyed by the records, the tokenizer's full definition, this template and its settings."""
        backend = getattr(self.tok, "backend_tokenizer", None)  # fast tokenizers: all of it in one JSON
        if not isinstance(records, Records) or backend is None:
            return self._encode_all(records, stats, kw)
        code = inspect.getsource(GistTemplate)  # a changed template never reads old examples
        key = [
            CACHE_VERSION,
            "examples",
            records.key,
            hashlib.sha256(backend.to_str().encode()).hexdigest(),
            hashlib.sha256(code.encode()).hexdigest(),
            self.gist_ids,
            self.max_length,
            self.overlong,
            self.eos,
            sorted(kw.items()),
            self.template,
            self.chat,
        ]

        def write(folder, counts):
            ex = self._encode_all(records, counts, kw)
            for name in Examples.ARRAYS:
                np.save(folder / f"{name}.npy", getattr(ex, name))

        return cached(
            key,
            write,
            lambda folder: Examples(*(np.load(folder / f"{name}.npy", mmap_mode="r") for name in Examples.ARRAYS)),
            stats,
        )

    def _encode_all(self, records, stats, kw) -> Examples:
        return Examples.pack(ex for ex in (self.encode(rec, stats, **kw) for rec in records) if ex is not None)
