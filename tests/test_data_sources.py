"""Nothing of the user's data is dropped unless asked; column maps and chat formats map onto our fields."""

from __future__ import annotations

import json

import pytest

from conftest import TINY
from gist_dist.config import load_config
from gist_dist.data import DataStats, load_records


def _records(n: int) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "", "output": str(i)} for i in range(n)]


def test_every_record_of_a_file_is_used_by_default(tmp_path):
    path = tmp_path / "big.jsonl"  # more than the old silent default of 2000
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(2500)))
    cfg = load_config(TINY, [f"data.train={path}", "data.num_train=0", "data.num_eval=0"])
    assert load_config(None).data.num_train == 0 and load_config(None).data.num_eval == 0
    stats = DataStats()
    records = load_records(str(path), n=cfg.data.num_train, stats=stats)
    assert len(records) == 2500 and records[-1]["output"] == "2499"
    assert (stats.records, stats.source_records) == (2500, 2500)


def test_a_limit_is_applied_only_when_asked_and_counted(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_records(300)))
    stats = DataStats()
    records = load_records(str(path), n=100, stats=stats)
    assert [r["output"] for r in records] == [str(i) for i in range(100)]  # the first 100, in order
    assert (stats.records, stats.source_records) == (100, 300)


def test_column_mapping_for_files_and_a_saved_dataset_folder(tmp_path):
    import datasets

    rows = [{"question": f"Say {i}.", "context": "", "answer": str(i)} for i in range(5)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        TINY, ["data.columns.instruction=question", "data.columns.input=context", "data.columns.output=answer"]
    )
    assert cfg.data.columns == {"instruction": "question", "input": "context", "output": "answer"}
    recs = load_records(str(path), columns=cfg.data.columns)
    assert recs[3] == {"instruction": "Say 3.", "input": "", "output": "3"}
    folder = tmp_path / "qa_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    assert load_records(str(folder), columns=cfg.data.columns) == recs
    from gist_dist.data import DataError

    with pytest.raises(DataError, match=r"qa.jsonl:1: missing field 'reply' \(mapped to 'output'"):
        load_records(str(path), columns={"instruction": "question", "output": "reply"})
    with pytest.raises(DataError, match="unknown field 'answer'"):
        load_records(str(path), columns={"answer": "answer"})


def test_messages_and_sharegpt_conversations_map_onto_instruction_input_output(tmp_path):
    from gist_dist.data import DataError

    messages = {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
        ]
    }
    sharegpt = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(messages) + "\n" + json.dumps(sharegpt) + "\n")
    assert load_records(str(path)) == [
        {"instruction": "Answer in French.", "input": "Hello", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Red"},
    ]
    multi = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    path.write_text(json.dumps(messages) + "\n" + json.dumps(multi) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: expected \[system,\] user, assistant turns"):
        load_records(str(path))
    stats = DataStats()
    assert len(load_records(str(path), bad_records="skip", stats=stats)) == 1 and stats.skipped_bad == 1
