"""The data cache: checked records and encoded examples, built once by whichever process takes the
lock first and read by every rank from memory-mapped files. Entries are keyed by content (a file's
sha256, a dataset's fingerprint), never by path and mtime."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from filelock import FileLock

from ..model import cache_dir
from .examples import ListLike
from .records import FIELDS, DataError, DataStats


class Records(ListLike):
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


def cached(key: list, write, read, stats: DataStats | None):
    """read(folder) of the cache entry for `key`, after write(folder, counts) made it: the first
    process to take the lock builds it (rank 0 or not, before or after torch.distributed starts),
    the others wait and read it. A build that fails (bad data) leaves nothing behind, so every rank
    fails with the same DataError. The counts of the build are restored into `stats` every time."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = data_cache_dir()
    target = root / digest
    with FileLock(root / f"{digest}.lock"):
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


def cached_records(source: str, key: list, records, stats: DataStats) -> Records:
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

    return cached(
        [CACHE_VERSION, source, *key],
        write,
        lambda folder: Records(datasets.Dataset.from_file(str(folder / "records.arrow")), folder.name),
        stats,
    )


def file_digest(path: Path) -> str:
    """Content hash: a file rewritten in place (same path, size and mtime) is never read stale."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
