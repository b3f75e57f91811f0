"""Peak memory per rank for a 100k-record JSONL: eager (every rank holds a list of record dicts and
a list of example dicts of Python ints, as gist-dist did before the Arrow cache) vs lazy
(load_records: one rank builds a memory-mapped Arrow cache, every rank reads it; encode_all keeps
int32 arrays). Ranks are started together as separate processes, as a launcher would.

    .venv/bin/python benchmarks/data_memory.py [--records 100000] [--ranks 2]

Per rank: the resident set after imports (torch, transformers, datasets in both modes) and the
tokenizer, then the peak (VmHWM, reset at that point through /proc/self/clear_refs so the
tokenizer's own transient peak does not hide the data's) while loading, encoding and drawing 100
batches; "data" is the difference. Mapped Arrow pages count in the lazy ranks' RSS although the
page cache shares them between ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, n: int):
    """Alpaca-sized records (about 80 tokens each in the template)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as fh:
        for i in range(n):
            w = [words[(i * 7 + j) % len(words)] for j in range(40)]
            rec = {
                "instruction": f"Rewrite the list {i} in reverse order, keeping every word.",
                "input": " ".join(w[:12]),
                "output": " ".join(reversed(w[:12])) + f" (list {i})",
            }
            fh.write(json.dumps(rec) + "\n")


def memory_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def worker(mode: str, data: str, rank: int, world: int):
    import datasets  # noqa: F401 - a fixed cost, imported before the baseline in both modes

    from gist_dist.config import ModelConfig
    from gist_dist.data import DataStats, GistTemplate, load_records
    from gist_dist.data.batches import ShardedBatches
    from gist_dist.data.sources import iter_file
    from gist_dist.model import load_tokenizer
    from gist_dist.tokens import add_gist_tokens

    tok = load_tokenizer(ModelConfig(name="smollm2"))
    template = GistTemplate(tok, add_gist_tokens(tok, 2), max_length=256)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base, t0 = memory_mb("VmRSS"), time.time()
    stats = DataStats()
    if mode == "eager":  # the representation before the cache: lists of dicts of Python objects
        records = list(iter_file(Path(data), stats, False, {}))
        examples = [ex for ex in (template.encode(r, stats) for r in records) if ex is not None]
    else:
        records = load_records(data, stats=stats)
        examples = template.encode_all(records, stats)
    batches = ShardedBatches(examples, 4, rank, world, seed=0)
    tokens = sum(len(e["input_ids"]) for _ in range(100) for e in next(batches))
    print(
        json.dumps(
            {
                "mode": mode,
                "rank": rank,
                "records": len(records),
                "examples": len(examples),
                "batch_tokens": tokens,
                "base_mb": round(base, 1),
                "peak_mb": round(memory_mb("VmHWM"), 1),
                "data_mb": round(memory_mb("VmHWM") - base, 1),
                "seconds": round(time.time() - t0, 1),
                "notes": [n.split(":")[0] for n in stats.notes],
            }
        ),
        flush=True,
    )


def run(mode: str, data: Path, ranks: int, cache: Path) -> list[dict]:
    env = {**os.environ, "GIST_DIST_DATA_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, "--data", str(data), "--rank", str(r), "--ranks", str(ranks)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(ranks)
    ]
    out = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{mode}: a rank failed")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--worker"), ap.add_argument("--data"), ap.add_argument("--rank", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.data, args.rank, args.ranks)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "records.jsonl"
        write_jsonl(data, args.records)
        print(f"{args.records} records, {data.stat().st_size / 2**20:.1f} MiB JSONL, {args.ranks} ranks")
        results = {m: run(m, data, args.ranks, Path(tmp) / f"cache-{m}") for m in ("eager", "lazy")}
    for rows in results.values():
        for r in rows:
            print(
                f"{r['mode']:5} rank {r['rank']}: peak {r['peak_mb']:7.1f} MB  before data {r['base_mb']:6.1f} MB  "
                f"data {r['data_mb']:6.1f} MB  {r['seconds']:5.1f} s  {r['examples']} examples  {r['notes']}"
            )
    for key in ("peak_mb", "data_mb"):
        eager, lazy = (max(r[key] for r in results[m]) for m in ("eager", "lazy"))
        print(f"eager/lazy {key} (worst rank): {eager:.1f} / {lazy:.1f} = {eager / max(lazy, 0.1):.2f}x")


if __name__ == "__main__":
    main()
