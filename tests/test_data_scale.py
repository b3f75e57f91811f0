"""Large sources: checked once into a memory-mapped Arrow cache (first process builds, the others
read it), records read lazily, examples stored compactly; counts as exact as the eager parser's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gist_dist.data import DataError, DataStats, Examples, GistTemplate, load_records
from gist_dist.data.batches import ShardedBatches
from gist_dist.data.cache import Records

N = 100_000


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    cache = tmp_path / "data_cache"
    monkeypatch.setenv("GIST_DIST_DATA_CACHE", str(cache))
    return cache


def _rec(i: int) -> dict:
    return {"instruction": f"Repeat the number {i}.", "input": f"context {i}" if i % 3 else "", "output": str(i)}


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """100k good records and 3 bad lines (at lines 2, 50002 and the last)."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    lines = [json.dumps(_rec(i)) for i in range(N)]
    lines.insert(1, "{oops")
    lines.insert(50001, json.dumps({"instruction": "no output"}))
    lines.append("[1, 2]")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_100k_jsonl_counts_exact_and_read_lazily(big_jsonl, data_cache):
    stats = DataStats()
    records = load_records(str(big_jsonl), bad_records="skip", stats=stats)
    assert isinstance(records, Records) and records.ds.cache_files  # memory-mapped, not in the heap
    assert (len(records), stats.records, stats.source_records, stats.skipped_bad) == (N, N, N, 3)
    assert records[0] == _rec(0) and records[-1] == _rec(N - 1) and records[54321] == _rec(54321)
    assert sum(1 for _ in records) == N
    assert any(n.startswith("data cache built") for n in stats.notes)

    again = DataStats()  # the second load reads the cache and restores the same counts
    first = load_records(str(big_jsonl), n=1000, bad_records="skip", stats=again)
    assert (len(first), again.records, again.source_records, again.skipped_bad) == (1000, 1000, N, 3)
    assert first[999] == _rec(999) and any(n.startswith("data cache read") for n in again.notes)

    before = sorted(p.name for p in data_cache.iterdir() if p.is_dir())
    with pytest.raises(DataError, match=r"big.jsonl:2: malformed JSON line"):
        load_records(str(big_jsonl))
    assert sorted(p.name for p in data_cache.iterdir() if p.is_dir()) == before  # a failed build leaves nothing


def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    import datasets

    rows = [_rec(i) for i in range(1000)] + [{"instruction": " ", "input": "", "output": "x"}]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    stats = DataStats()
    records = load_records(str(folder), bad_records="skip", stats=stats)
    assert (len(records), stats.source_records, stats.skipped_bad) == (1000, 1000, 1)
    assert list(records) == [_rec(i) for i in range(1000)]
    with pytest.raises(DataError, match=r"ds: record 1000: empty 'instruction'"):
        load_records(str(folder))

    splits = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:10]), "test": datasets.Dataset.from_list(rows[10:15])}
    ).save_to_disk(str(splits))
    assert len(load_records(str(splits))) == 10 and load_records(f"{splits}:test")[0] == _rec(10)

    datasets.Dataset.from_list(rows[500:600]).save_to_disk(str(tmp_path / "ds2"))  # re-saved in place
    os.replace(folder, tmp_path / "old")
    os.replace(tmp_path / "ds2", folder)
    assert load_records(str(folder)) == [_rec(i) for i in range(500, 600)]


@pytest.mark.parametrize("as_folder", [False, True])  # a file, or a folder `datasets` reads
def test_a_file_rewritten_in_place_is_read_again(tmp_path, as_folder):
    path = tmp_path / "d" / "train.jsonl"
    path.parent.mkdir()
    source = str(path.parent if as_folder else path)
    path.write_text(json.dumps(_rec(1)) + "\n")
    stamp = path.stat()
    assert load_records(source) == [_rec(1)]
    path.write_text(json.dumps(_rec(2)) + "\n")  # same size; same mtime restored below
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size
    assert load_records(source) == [_rec(2)]


WORKER = textwrap.dedent("""
    import json, sys
    from gist_dist.data import DataError, DataStats, load_records
    stats = DataStats()
    try:
        records = load_records(sys.argv[1], bad_records=sys.argv[2], stats=stats)
        print(json.dumps({"records": len(records), "bad": stats.skipped_bad, "notes": stats.notes}))
    except DataError as e:
        print(json.dumps({"error": str(e)}))
""")


def _two_processes(path, bad_records, cache):
    env = {**os.environ, "GIST_DIST_DATA_CACHE": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), bad_records],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_two_processes_started_together_build_the_cache_once(big_jsonl, tmp_path):
    results = _two_processes(big_jsonl, "skip", tmp_path / "shared_cache")
    assert [(r["records"], r["bad"]) for r in results] == [(N, 3)] * 2
    notes = [n.split(":")[0] for r in results for n in r["notes"]]
    assert sorted(notes) == ["data cache built", "data cache read"]
    # Bad data: no cache is left for the other process to trust, so both fail with the same line.
    results = _two_processes(big_jsonl, "error", tmp_path / "shared_cache")
    assert [r["error"] for r in results] == [
        f"{big_jsonl}:2: malformed JSON line (Expecting property name enclosed in double quotes)"
    ] * 2


@pytest.mark.slow
def test_two_processes_load_a_saved_dataset_folder_once(tmp_path):
    """A `datasets` source (a save_to_disk folder): the first process builds the cache, the other reads it."""
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([_rec(i) for i in range(2000)]).save_to_disk(str(folder))
    results = _two_processes(folder, "error", tmp_path / "shared_cache")
    assert [(r["records"], r["bad"]) for r in results] == [(2000, 0)] * 2
    notes = [n.split(":")[0] for r in results for n in r["notes"]]
    assert sorted(notes) == ["data cache built", "data cache read"]


@pytest.fixture(scope="module")
def template():
    from gist_dist.config import ModelConfig
    from gist_dist.model import load_tokenizer
    from gist_dist.tokens import add_gist_tokens

    tok = load_tokenizer(ModelConfig(name="smollm2"))
    return GistTemplate(tok, add_gist_tokens(tok, 2), max_length=40)


def test_compact_examples_equal_the_encoded_dicts_and_batch_the_same(template, tmp_path):
    path = tmp_path / "d.jsonl"
    recs = [_rec(i) for i in range(300)] + [{"instruction": "Say it.", "input": "", "output": "word " * 60}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = load_records(str(path))
    stats, plain_stats = DataStats(), DataStats()
    examples = template.encode_all(records, stats)
    plain = [template.encode(r, plain_stats) for r in recs]
    assert isinstance(examples, Examples) and examples == plain and stats.truncated == plain_stats.truncated == 1
    assert examples.nbytes() < 4 * 30 * len(plain)  # about 4 bytes a token
    assert examples[-1] == plain[-1] and examples[10:20:3] == plain[10:20:3]
    assert examples[10:20:3][-1] == plain[19]
    assert stats.notes[-1].startswith("data cache built")
    again = DataStats()  # encoded once: the next process maps the arrays and gets the same counts
    cached = template.encode_all(records, again)
    assert cached == plain and again.truncated == 1 and again.notes[-1].startswith("data cache read")
    assert isinstance(cached.ids, np.memmap)
    longer = GistTemplate(template.tok, template.gist_ids, 400).encode_all(records, again)  # another key
    assert again.notes[-1].startswith("data cache built") and longer[-1] != plain[-1] and longer[0] == plain[0]
    a = ShardedBatches(examples, 4, 1, 2, seed=5)
    b = ShardedBatches(plain, 4, 1, 2, seed=5)
    assert [next(a) for _ in range(50)] == [next(b) for _ in range(50)]


def test_two_torchrun_ranks_train_on_a_jsonl_with_one_cache_build(tmp_path):
    """The trainer as launched: 2 ranks load the same file; one of them checks it and encodes it,
    and the start record counts every record."""
    from conftest import TINY, torchrun

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(_rec(i)) + "\n" for i in range(3000)) + "{oops\n")
    cache, out = tmp_path / "cache", tmp_path / "run"
    proc = torchrun(
        [
            "train",
            TINY,
            f"output_dir={out}",
            f"data.train={path}",
            "data.bad_records=skip",
            "data.num_train=0",
            "train.max_steps=2",
        ],
        env={"GIST_DIST_DATA_CACHE": str(cache)},
    )
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (start["data"]["records"], start["data"]["source_records"], start["data"]["skipped_bad"]) == (3000, 3000, 1)
    built = [
        line.split(" cache of ")[1].split(" in ")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("gist_dist.data: built")
    ]
    assert sorted(built) == sorted([str(path), "examples"])  # once each, not once per rank
