"""Records -> prompt template with gist tokens -> token ids/labels -> padded batches with 4D masks.

Templates (data.template; the instruction is compressed, the input stays visible):

    alpaca       the paper's layout:
                 Instruction: {instruction}\n<GIST_0>...<GIST_{k-1}>\nInput: {input}\nOutput: {output}<eos>
    chat         the tokenizer's own chat template: the user turn is the instruction, the gist tokens,
                 then "\n" + the input; the answer is the assistant turn (labels: answer + end of turn)
    chat_system  the tokenizer's chat template with the instruction + gist as the system message and
                 the input as the user turn (`gist-dist compress`: the prompt is a system prompt)

The chat templates render the tokenizer's template once with placeholder contents and keep the
fixed text around them (its header before the instruction stays when the prompt is left out).

User text is tokenized with `split_special_tokens=True`, and gist ids are inserted as ids, so
text like "<GIST_0>" or "<|im_start|>" inside data can never become a special token.

Files and `datasets` sources are checked once, by the first process to get there, into a
memory-mapped Arrow file in data_cache_dir(); encode_all of those records is stored once as
memory-mapped int32 arrays. Every rank reads both lazily, with the same counts (DataStats).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import datagen
from .config import TEMPLATES
from .masks import model_inputs  # noqa: F401 - re-exported for old callers
from .model import _file_lock, cache_dir

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


def _check_text(path: Path) -> bool:
    """One streaming pass: valid UTF-8 and not blank, as a whole file would be checked. Returns
    whether the file is one JSON list (a .json name, or `[` first) rather than JSON lines."""
    first = None
    with open(path, "rb") as fh:
        offset = 0
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {offset + e.start})") from None
            offset += len(raw)
            if first is None and line.strip():
                first = line.lstrip()[0]
    if first is None:
        raise DataError(f"{path}: file is empty")
    return path.suffix == ".json" or first == "["


def _checked(items, stats: DataStats, skip_bad: bool, columns: dict):
    """Checked records of (record, where) pairs; bad ones raise, or are counted and skipped."""
    for rec, where in items:
        try:
            yield _check_record(rec, where, columns)
        except DataError:
            if not skip_bad:
                raise
            stats.skipped_bad += 1


def _iter_file(path: Path, stats: DataStats, skip_bad: bool, columns: dict):
    """Checked records of a JSON or JSONL file, in order; JSON lines are read one at a time."""
    if _check_text(path):
        try:
            data = _loads(path.read_bytes().decode("utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        yield from _checked(((rec, f"{path}: record {i}") for i, rec in enumerate(data)), stats, skip_bad, columns)
        return

    def lines():
        with open(path, encoding="utf-8-sig", newline="\n") as fh:  # split at \n only: strings may hold U+2028
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield _loads(line), f"{path}:{lineno}"
                except json.JSONDecodeError as e:
                    if not skip_bad:
                        raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                    stats.skipped_bad += 1

    yield from _checked(lines(), stats, skip_bad, columns)


def _saved_to_disk(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _open_dataset(source: str, cache_dir: Path | None = None):
    import datasets
    name, _, ds_split = source.partition(":")
    try:
        if _saved_to_disk(Path(name)):
            ds = datasets.load_from_disk(name)
            return ds[ds_split or "train"] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name, split=ds_split or "train", cache_dir=cache_dir and str(cache_dir))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; report one line
        raise DataError(f"{source}: cannot load data ({type(e).__name__}: {str(e).splitlines()[0]})") from None


class _Seq(Sequence):
    """A read-only sequence that compares equal to a list with the same items."""

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self):
        return f"<{type(self).__name__} of {len(self)}>"


class Records(_Seq):
    """Checked records read lazily from a memory-mapped Arrow file: the bytes live once on disk and
    in the page cache, shared by every rank on the machine, not in each rank's heap. `key` names
    the cached content (GistTemplate.encode_all caches its examples under it)."""

    def __init__(self, ds, key: str):
        self.ds, self.key = ds, key

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            r = range(len(self))[i]
            return Records(self.ds.select(r), f"{self.key}[{r.start}:{r.stop}:{r.step}]")
        return self.ds[range(len(self))[i]]

    def __iter__(self):
        for batch in self.ds.iter(batch_size=1000):
            yield from (dict(zip(batch, row)) for row in zip(*batch.values()))


CACHE_VERSION = 1  # bump when the checked-record format changes
COUNTS = ("skipped_bad", "truncated", "dropped_overlong")  # what a cached build restores into DataStats


def data_cache_dir() -> Path:
    """GIST_DIST_DATA_CACHE, else the data/ folder of the model cache (GIST_DIST_CACHE)."""
    d = Path(os.environ.get("GIST_DIST_DATA_CACHE") or cache_dir() / "data")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cached(key: list, write, read, stats: DataStats | None):
    """read(folder) of the cache entry for `key`, after write(folder, counts) made it: the first
    process to take the lock builds it (rank 0 or not, before or after torch.distributed starts),
    the others wait and read it. A build that fails (bad data) leaves nothing behind, so every rank
    fails with the same DataError. The counts of the build are restored into `stats` every time."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = data_cache_dir()
    target = root / digest
    with _file_lock(root / f"{digest}.lock"):
        built = not (target / "meta.json").is_file()
        if built:
            tmp = root / f"{digest}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            counts = DataStats()
            try:
                write(tmp, counts)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            (tmp / "meta.json").write_text(json.dumps({"key": key, **{k: getattr(counts, k) for k in COUNTS}}))
            tmp.rename(target)
            print(f"gist_dist.data: built the cache of {key[1]} in {target.parent}", file=sys.stderr, flush=True)
    meta = json.loads((target / "meta.json").read_text())
    if stats is not None:
        for k in COUNTS:
            setattr(stats, k, getattr(stats, k) + meta[k])
        stats.notes.append(f"data cache {'built' if built else 'read'}: {target}")
    return read(target)


def _cached_records(source: str, key: list, records, stats: DataStats) -> Records:
    """Checked records (records(counts) yields them) as an Arrow file in the cache."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    def write(folder, counts):
        features = datasets.Features({k: datasets.Value("string") for k in FIELDS})
        with ArrowWriter(features=features, path=str(folder / "records.arrow")) as writer:
            for rec in records(counts):
                writer.write(rec)
            if writer.finalize()[0] == 0:
                raise DataError(f"{source}: no usable records")

    return _cached([CACHE_VERSION, source, *key], write,
                   lambda folder: Records(datasets.Dataset.from_file(str(folder / "records.arrow")), folder.name), stats)


def _file_digest(path: Path) -> str:
    """Content hash: a file rewritten in place (same path, size and mtime) is never read stale."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_records(source: str, *, split: str = "seen", n: int = 0, seed: int = 0,
                 bad_records: str = "error", stats: DataStats | None = None, role: str = "train",
                 columns: dict | None = None) -> Sequence[dict]:
    """Records from "generated[:seen|unseen]", a JSON/JSONL file, or a `datasets` source.

    Files and `datasets` sources are checked once into an Arrow file in data_cache_dir() (keyed by
    content hash, columns and bad_records), by whichever process gets there first; every process
    then reads it lazily (Records). Generated data is a plain list.

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
        path, skip = Path(source), bad_records == "skip"
        digest = _file_digest(path)  # every rank hashes (a streaming read); one parses
        records = _cached_records(source, ["file", digest, columns or {}, skip],
                                  lambda counts: _iter_file(path, counts, skip, columns or {}), stats)
    elif Path(source).suffix in (".json", ".jsonl") or "/" in source and source.startswith((".", "/")) \
            and not Path(source.partition(":")[0]).exists():  # "folder:split" names a folder's split
        raise DataError(f"{source}: data file not found")
    else:  # any `datasets` source: a local dataset folder, or a hub name when online
        skip = bad_records == "skip"
        folder = Path(source.partition(":")[0])
        files = sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []
        if files and not _saved_to_disk(folder):  # raw data files: `datasets` would cache them by
            stamp = [(str(f.relative_to(folder)), _file_digest(f)) for f in files]  # path and mtime
            hf_cache = data_cache_dir() / ("hf-" + hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24])
        else:  # save_to_disk folders carry a content fingerprint; hub datasets are versioned
            stamp, hf_cache = [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files], None
        lock = hashlib.sha256(source.encode()).hexdigest()[:24]
        with _file_lock(data_cache_dir() / f"{lock}.open.lock"):  # a hub download is prepared once, too
            ds = _open_dataset(source, hf_cache)
        records = _cached_records(source, ["datasets", ds._fingerprint, stamp, columns or {}, skip],
                                  lambda counts: _checked(((rec, f"{source}: record {i}") for i, rec in enumerate(ds)),
                                                          counts, skip, columns or {}), stats)
    if not records:
        raise DataError(f"{source}: no usable records")
    stats.source_records = len(records)
    if n and len(records) > n:
        records = records[:n]
    stats.records = len(records)
    return records


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
    turns = ([{"role": "system", "content": instruction}, {"role": "user", "content": inp}] if layout == "chat_system"
             else [{"role": "user", "content": instruction + inp}])
    text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": output}], tokenize=False)
    parts = []
    for slot in _SLOTS:
        if text.count(slot) != 1:
            raise DataError(f"data.template={layout}: the tokenizer's chat template does not keep message text as is")
        before, text = text.split(slot)
        parts.append(before)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in parts + [text]]  # template text: specials stay
    eos = tokenizer.eos_token_id
    end = ids[3][:ids[3].index(eos) + 1] if eos in ids[3] else [eos]
    return ids[0], ids[1], ids[2], end


class GistTemplate:
    """Tokenizes records into the gist template. One instance per (tokenizer, gist ids, template)."""

    def __init__(self, tokenizer, gist_ids: list[int], max_length: int, overlong: str = "truncate",
                 template: str = "alpaca"):
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

    def encode(self, rec: dict, stats: DataStats | None = None, *, with_gist: bool = True,
               with_prompt: bool = True, with_output: bool = True) -> dict | None:
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
        key = [CACHE_VERSION, "examples", records.key, hashlib.sha256(backend.to_str().encode()).hexdigest(),
               hashlib.sha256(code.encode()).hexdigest(), self.gist_ids, self.max_length, self.overlong, self.eos,
               sorted(kw.items()), self.template, self.chat]

        def write(folder, counts):
            ex = self._encode_all(records, counts, kw)
            for name in Examples.ARRAYS:
                np.save(folder / f"{name}.npy", getattr(ex, name))

        return _cached(key, write, lambda folder: Examples(
            *(np.load(folder / f"{name}.npy", mmap_mode="r") for name in Examples.ARRAYS)), stats)

    def _encode_all(self, records, stats, kw) -> Examples:
        return Examples.pack(ex for ex in (self.encode(rec, stats, **kw) for rec in records) if ex is not None)


class Examples(_Seq):
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
        ids = self.ids[self.starts[j]:self.starts[j + 1]].tolist()
        head = int(self.heads[j])
        return {"input_ids": ids, "labels": [IGNORE] * head + ids[head:], "prompt_tokens": int(self.prompts[j])}

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.ARRAYS)


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
