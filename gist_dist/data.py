"""Records -> prompt template with gist tokens -> token ids/labels -> padded batches with 4D masks.

Template (the paper's Alpaca layout: the instruction is compressed, the input stays visible):

    Instruction: {instruction}\n<GIST_0>...<GIST_{k-1}>\nInput: {input}\nOutput: {output}<eos>

User text is tokenized with `split_special_tokens=True`, and gist ids are inserted as ids, so
text like "<GIST_0>" or "<|im_start|>" inside data can never become a special token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import datagen
from .gist import make_attention_mask, position_ids_from

IGNORE = -100


class DataError(ValueError):
    """Bad input data: the message names the file and line."""


GENERATED_DEFAULT = {"train": 2000, "eval": 64}  # generated data has no natural size


@dataclass
class DataStats:
    records: int = 0  # records used
    source_records: int = 0  # records the source holds (after skipped bad ones)
    skipped_bad: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    notes: list = field(default_factory=list)

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items() if k != "notes"}


FIELDS = ("instruction", "input", "output")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _from_conversation(turns, where: str) -> dict:
    """`messages` ([{role, content}]) or ShareGPT `conversations` ([{from, value}]) -> one record:
    an optional system message is the instruction (and the user turn the input), else the user turn
    is the instruction; the assistant turn is the output. One exchange per record."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: a conversation must be a list of objects")
    pairs = []
    for t in turns:
        role, text = t.get("role", t.get("from")), t.get("content", t.get("value"))
        if role not in ROLES:
            raise DataError(f"{where}: unknown conversation role {role!r} (known: {', '.join(ROLES)})")
        pairs.append((ROLES[role], text))
    roles = [r for r, _ in pairs]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise DataError(f"{where}: expected [system,] user, assistant turns, got {roles} "
                        f"(multi-turn conversations are not split into records; use bad_records=skip to count and skip them)")
    texts = dict(pairs)
    if "system" in texts:
        return {"instruction": texts["system"], "input": texts["user"], "output": texts["assistant"]}
    return {"instruction": texts["user"], "input": "", "output": texts["assistant"]}


def _map_record(rec: dict, columns: dict, where: str) -> dict:
    """The user's field names (data.columns.instruction=question, ...) or a conversation -> our fields."""
    for conv in ("messages", "conversations"):
        if conv in rec and "instruction" not in columns:
            return _from_conversation(rec[conv], where)
    if not columns:
        return rec
    mapped = dict(rec)
    for ours, theirs in columns.items():
        if theirs not in rec:
            raise DataError(f"{where}: missing field {theirs!r} (mapped to {ours!r} by data.columns)")
        mapped[ours] = rec[theirs]
    return mapped


def _check_record(rec, where: str, columns: dict | None = None) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    rec = _map_record(rec, columns or {}, where)
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = rec.get(key, None if required else "")
        if value is None:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        if not _encodable(value):  # e.g. "\ud800" from a JSON escape: tokenizers crash on it
            raise DataError(f"{where}: field {key!r} holds an unpaired surrogate (not valid Unicode text)")
    if not rec["instruction"].strip():
        raise DataError(f"{where}: empty 'instruction'")
    return {"instruction": rec["instruction"], "input": rec.get("input", "") or "", "output": rec["output"]}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _loads(text: str):
    """json.loads, with absurdly deep nesting reported like any other malformed JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def _parse_file(path: Path, stats: DataStats, skip_bad: bool, columns: dict) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is fine
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    out = []

    def take(rec, where):
        try:
            out.append(_check_record(rec, where, columns))
        except DataError:
            if not skip_bad:
                raise
            stats.skipped_bad += 1

    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = _loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(data):
            take(rec, f"{path}: record {i}")
    else:
        for lineno, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028 etc.
            if not line.strip():
                continue
            try:
                rec = _loads(line)
            except json.JSONDecodeError as e:
                if not skip_bad:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                stats.skipped_bad += 1
                continue
            take(rec, f"{path}:{lineno}")
    return out


def load_records(source: str, *, split: str = "seen", n: int = 0, seed: int = 0,
                 bad_records: str = "error", stats: DataStats | None = None, role: str = "train",
                 columns: dict | None = None) -> list[dict]:
    """Records from "generated[:seen|unseen]", a JSON/JSONL file, or a `datasets` source.

    n = 0 keeps every record (generated data: GENERATED_DEFAULT[role]); n > 0 keeps the first n,
    and `stats` records how many were used of how many. `columns` maps our fields to the source's
    (e.g. {"instruction": "question"}); `messages` / ShareGPT `conversations` records are mapped too."""
    stats = stats if stats is not None else DataStats()
    unknown = set(columns or {}) - set(FIELDS)
    if unknown:
        raise DataError(f"data.columns: unknown field {sorted(unknown)[0]!r} (map onto {', '.join(FIELDS)})")
    if source.startswith("generated"):
        gen_split = source.split(":", 1)[1] if ":" in source else split
        records = [_check_record(r, "generated") for r in datagen.generate(n or GENERATED_DEFAULT[role], gen_split, seed)]
    elif Path(source).is_file():
        records = _parse_file(Path(source), stats, bad_records == "skip", columns or {})
    elif Path(source).suffix in (".json", ".jsonl") or "/" in source and not Path(source).exists() and source.startswith((".", "/")):
        raise DataError(f"{source}: data file not found")
    else:  # any `datasets` source: a local dataset folder, or a hub name when online
        import datasets
        name, _, ds_split = source.partition(":")
        try:
            if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(name)  # a folder written by save_to_disk
                ds = ds[ds_split or "train"] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                ds = datasets.load_dataset(name, split=ds_split or "train")
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; report one line
            raise DataError(f"{source}: cannot load data ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        records = []
        for i, rec in enumerate(ds):
            try:
                records.append(_check_record(rec, f"{source}: record {i}", columns))
            except DataError:
                if bad_records != "skip":
                    raise
                stats.skipped_bad += 1
    if not records:
        raise DataError(f"{source}: no usable records")
    stats.source_records = len(records)
    if n and len(records) > n:
        records = records[:n]
    stats.records = len(records)
    return records


class GistTemplate:
    """Tokenizes records into the gist template. One instance per (tokenizer, gist ids)."""

    def __init__(self, tokenizer, gist_ids: list[int], max_length: int, overlong: str = "truncate"):
        self.tok = tokenizer
        self.gist_ids = list(gist_ids)
        self.max_length = max_length
        self.overlong = overlong
        self.eos = tokenizer.eos_token_id

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def pieces(self, rec: dict):
        prompt = self.text_ids(f"Instruction: {rec['instruction']}\n")
        tail = f"\nInput: {rec['input']}\nOutput:" if rec.get("input") else "\nOutput:"
        return prompt, self.text_ids(tail), self.text_ids(" " + rec["output"]) + [self.eos]

    def encode(self, rec: dict, stats: DataStats | None = None, *, with_gist: bool = True,
               with_prompt: bool = True, with_output: bool = True) -> dict | None:
        """One example. Returns None if it must be dropped (overlong and overlong=drop)."""
        prompt, tail, output = self.pieces(rec)
        head = (prompt if with_prompt else []) + (self.gist_ids if with_gist else []) + tail
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

    def encode_all(self, records, stats: DataStats | None = None, **kw) -> list[dict]:
        out = []
        for rec in records:
            ex = self.encode(rec, stats, **kw)
            if ex is not None:
                out.append(ex)
        return out


def pad_batch(examples: list[dict], pad_id: int, left: bool = False) -> dict:
    """Pad to the longest example. Returns input_ids, attention_mask, labels (2D)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids, att, lab = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = T - n
        labels = e.get("labels", [IGNORE] * n)
        if left:
            ids.append([pad_id] * pad + e["input_ids"]); att.append([0] * pad + [1] * n)
            lab.append([IGNORE] * pad + labels)
        else:
            ids.append(e["input_ids"] + [pad_id] * pad); att.append([1] * n + [0] * pad)
            lab.append(labels + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(att), "labels": torch.tensor(lab)}


def model_inputs(batch: dict, gist_ids, mode: str, dtype=torch.float32) -> dict:
    """2D batch -> kwargs for an HF causal LM: 4D gist mask (padding folded in) + positions."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": make_attention_mask(batch["input_ids"], batch["attention_mask"], gist_ids, mode, dtype),
        "position_ids": position_ids_from(batch["attention_mask"]),
    }
