"""What a record is: the instruction / input / output fields, their checks, and the mappings onto
them (data.columns, `messages` and ShareGPT `conversations`)."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data: the message names the file and line."""


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
        raise DataError(
            f"{where}: expected [system,] user, assistant turns, got {roles} "
            f"(multi-turn conversations are not split into records; use bad_records=skip to count and skip them)"
        )
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


def check_record(rec, where: str, columns: dict | None = None) -> dict:
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


def checked(items, stats: DataStats, skip_bad: bool, columns: dict):
    """Checked records of (record, where) pairs; bad ones raise, or are counted and skipped."""
    for rec, where in items:
        try:
            yield check_record(rec, where, columns)
        except DataError:
            if not skip_bad:
                raise
            stats.skipped_bad += 1
