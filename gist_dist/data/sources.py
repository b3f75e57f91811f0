"""Where records come from: generated tasks, JSON / JSONL files, or any `datasets` source (a local
dataset folder, or a hub name when online). Files and datasets are checked once into the cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

from . import datagen
from .cache import cached_records, data_cache_dir, file_digest
from .records import FIELDS, DataError, DataStats, check_record, checked

GENERATED_DEFAULT = {"train": 2000, "eval": 64}  # generated data has no natural size


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


def iter_file(path: Path, stats: DataStats, skip_bad: bool, columns: dict):
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
        yield from checked(((rec, f"{path}: record {i}") for i, rec in enumerate(data)), stats, skip_bad, columns)
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

    yield from checked(lines(), stats, skip_bad, columns)


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


def load_records(
    source: str,
    *,
    split: str = "seen",
    n: int = 0,
    seed: int = 0,
    bad_records: str = "error",
    stats: DataStats | None = None,
    role: str = "train",
    columns: dict | None = None,
) -> Sequence[dict]:
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
        records = [
            check_record(r, "generated") for r in datagen.generate(n or GENERATED_DEFAULT[role], gen_split, seed)
        ]
    elif Path(source).is_file():
        path, skip = Path(source), bad_records == "skip"
        digest = file_digest(path)  # every rank hashes (a streaming read); one parses
        records = cached_records(
            source,
            ["file", digest, columns or {}, skip],
            lambda counts: iter_file(path, counts, skip, columns or {}),
            stats,
        )
    elif (
        Path(source).suffix in (".json", ".jsonl")
        or "/" in source
        and source.startswith((".", "/"))
        and not Path(source.partition(":")[0]).exists()
    ):  # "folder:split" names a folder's split
        raise DataError(f"{source}: data file not found")
    else:  # any `datasets` source: a local dataset folder, or a hub name when online
        skip = bad_records == "skip"
        folder = Path(source.partition(":")[0])
        files = sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []
        if files and not _saved_to_disk(folder):  # raw data files: `datasets` would cache them by
            stamp = [(str(f.relative_to(folder)), file_digest(f)) for f in files]  # path and mtime
            hf_cache = data_cache_dir() / ("hf-" + hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24])
        else:  # save_to_disk folders carry a content fingerprint; hub datasets are versioned
            stamp, hf_cache = (
                [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                None,
            )
        lock = hashlib.sha256(source.encode()).hexdigest()[:24]
        with FileLock(data_cache_dir() / f"{lock}.open.lock"):  # a hub download is prepared once, too
            ds = _open_dataset(source, hf_cache)
        records = cached_records(
            source,
            ["datasets", ds._fingerprint, stamp, columns or {}, skip],
            lambda counts: checked(
                ((rec, f"{source}: record {i}") for i, rec in enumerate(ds)), counts, skip, columns or {}
            ),
            stats,
        )
    if not records:
        raise DataError(f"{source}: no usable records")
    stats.source_records = len(records)
    if n and len(records) > n:
        records = records[:n]
    stats.records = len(records)
    return records


def text_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a small UTF-8 text file the user names (queries, checks); DataError when it is missing
    or not text."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8") from None
