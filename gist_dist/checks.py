"""Task checks (`gist-dist compress --checks FILE`): what an answer to a query must contain, scored for the
teacher (the full prompt), the student (the gist tokens) and the no-prompt baseline.

Agreement and ROUGE-L against the teacher can stay high while the student loses the prompt's facts (a
time, a price, a field name); a check asks for exactly those. One JSON object a line:

    {"query": "When is the first boat?", "contains": ["07:10"]}
    {"query": "Extract the fields.", "json_keys": ["name", "date"], "regex": "\\\\d{4}-\\\\d{2}-\\\\d{2}"}

`contains`: every string appears in the answer (case-insensitive); `regex`: Python `re.search` finds it;
`json_keys`: the answer holds a JSON object (the first `{...}` that parses) with every key. A check gives
any of the three, and passes when all it gives hold. Each query is held out of training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .data import DataError
from .data.sources import text_lines

TESTS = ("contains", "regex", "json_keys")


@dataclass(frozen=True)
class Check:
    query: str
    contains: tuple[str, ...] = ()
    regex: str | None = None
    json_keys: tuple[str, ...] = ()

    def passes(self, answer: str) -> bool:
        if any(s.lower() not in answer.lower() for s in self.contains):
            return False
        if self.regex is not None and not re.search(self.regex, answer):
            return False
        if self.json_keys:
            obj = first_json_object(answer)
            return obj is not None and all(k in obj for k in self.json_keys)
        return True

    def as_dict(self) -> dict:
        tests = {"contains": list(self.contains), "regex": self.regex, "json_keys": list(self.json_keys)}
        return {"query": self.query, **{k: v for k, v in tests.items() if v}}


def first_json_object(text: str) -> dict | None:
    """The first `{...}` in text that parses as a JSON object, else None."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _strings(value, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise DataError(f"{where}: {key!r} must be a non-empty list of non-empty strings")
    return tuple(value)


def parse_check(line: str, where: str) -> Check:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a check must be a JSON object")
    unknown = sorted(set(obj) - {"query", *TESTS})
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} (known: query, {', '.join(TESTS)})")
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: 'query' must be a non-empty string")
    if not any(k in obj for k in TESTS):
        raise DataError(f"{where}: a check needs at least one of {', '.join(TESTS)}")
    regex = obj.get("regex")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise DataError(f"{where}: 'regex' must be a non-empty string")
        try:
            re.compile(regex)
        except re.error as e:
            raise DataError(f"{where}: 'regex' does not compile ({e})") from None
    return Check(
        query.strip(),
        _strings(obj["contains"], "contains", where) if "contains" in obj else (),
        regex,
        _strings(obj["json_keys"], "json_keys", where) if "json_keys" in obj else (),
    )


def read_checks(path: str | Path) -> list[Check]:
    """Every check of a JSONL file; the first bad line raises DataError naming the file and line."""
    checks, seen = [], {}
    for lineno, line in enumerate(text_lines(path, "checks"), 1):
        if not line.strip():
            continue
        check = parse_check(line, f"{path}:{lineno}")
        if check.query in seen:
            raise DataError(f"{path}:{lineno}: query {check.query!r} is checked already on line {seen[check.query]}")
        seen[check.query] = lineno
        checks.append(check)
    if not checks:
        raise DataError(f"{path}: no checks")
    return checks


def score(checks: list[Check], answers: dict[str, dict[str, str]]) -> list[dict]:
    """Per check, whether each answerer's answer passes: answers = {who: {query: answer}}."""
    return [
        {"query": c.query, **{f"{who}_passed": c.passes(by_query[c.query]) for who, by_query in answers.items()}}
        for c in checks
    ]
