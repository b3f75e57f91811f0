"""Task checks of `gist-dist compress --checks`: parsing (bad lines named), scoring on hand-made answers,
their queries held out of training, pass rates with intervals, and the verdict line they join."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, gist_dist
from gist_dist import compress
from gist_dist.checks import Check, first_json_object, parse_check, read_checks, score
from gist_dist.config import load_config
from gist_dist.data import DataError
from gist_dist.fidelity import check_rates, query_intervals, verdict


def test_each_test_of_a_check_on_hand_made_answers():
    times = Check("first boat?", contains=("07:10", "Port Avel"))
    assert times.passes("The first boat leaves port avel at 07:10.")  # contains: case-insensitive
    assert not times.passes("The first boat leaves Port Avel at 2023-02-22.")
    date = Check("when?", regex=r"\b\d{2}:\d{2}\b")
    assert date.passes("at 07:10") and not date.passes("at seven")
    fields = Check("extract", json_keys=("name", "date"))
    assert fields.passes('Here you go: {"name": "Ana", "date": "2024-01-02"} - done')
    assert not fields.passes('{"name": "Ana"}')  # a key missing
    assert not fields.passes('{"name": "Ana", "date": ')  # malformed JSON
    assert not fields.passes('["name", "date"]')  # not an object
    assert first_json_object('x {bad} {"a": 1}') == {"a": 1}  # the first {...} that parses
    every = Check("all", contains=("Ana",), regex=r"\d{4}", json_keys=("name",))
    assert every.passes('{"name": "Ana", "year": 2024}') and not every.passes('{"name": "Bo", "year": 2024}')


def test_score_reads_each_answerer_answer_by_query():
    checks = [Check("a?", contains=("x",)), Check("b?", contains=("y",))]
    rows = score(checks, {"teacher": {"a?": "x", "b?": "y"}, "student": {"a?": "x", "b?": "no"}})
    assert rows == [
        {"query": "a?", "teacher_passed": True, "student_passed": True},
        {"query": "b?", "teacher_passed": True, "student_passed": False},
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"query": "q", "contains": ["x"]', "malformed JSON"),
        ('["q"]', "a check must be a JSON object"),
        ('{"query": "q"}', "needs at least one of contains, regex, json_keys"),
        ('{"query": "", "contains": ["x"]}', "'query' must be a non-empty string"),
        ('{"query": "q", "contains": "x"}', "'contains' must be a non-empty list"),
        ('{"query": "q", "regex": "("}', "'regex' does not compile"),
        ('{"query": "q", "json_keys": [1]}', "'json_keys' must be a non-empty list"),
        ('{"query": "q", "contain": ["x"]}', "unknown key 'contain'"),
    ],
)
def test_a_bad_check_line_names_its_file_and_line(tmp_path, line, message):
    path = tmp_path / "checks.jsonl"
    path.write_text('{"query": "ok?", "contains": ["x"]}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"^{path}:3: .*{message}"):
        read_checks(path)


def test_a_query_checked_twice_or_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "checks.jsonl"
    path.write_text('{"query": "q", "contains": ["x"]}\n{"query": "q", "regex": "y"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: query 'q' is checked already on line 1$"):
        read_checks(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no checks"):
        read_checks(path)
    assert parse_check('{"query": " q ", "regex": "y"}', "x").as_dict() == {"query": "q", "regex": "y"}


def test_a_bad_checks_file_stops_compress_in_one_line_before_anything_is_written(tmp_path):
    prompt, checks, out = tmp_path / "p.txt", tmp_path / "checks.jsonl", tmp_path / "run"
    prompt.write_text("You are the ferry company's assistant.")
    checks.write_text('{"query": "q", "contains": ["x"]}\n{"query": "r", "regex": "("}\n')
    proc = gist_dist(
        ["compress", "--prompt-file", prompt, "--num-gist", "2", "--checks", checks, "--config", TINY]
        + [f"output_dir={out}"],
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(ours) == 1 and ours[0].startswith(f"gist-dist: error: {checks}:2: 'regex' does not compile"), ours
    assert not out.exists()


def test_check_queries_are_held_out_and_never_trained_on(tmp_path, monkeypatch):
    """With the --heldout share (no --heldout-queries) and with a held-out file alike; a checked query
    among the training queries is refused."""
    monkeypatch.setattr(compress.dist, "init", lambda timeout_s: None)  # one process: no process group here
    prompt, train, checks = tmp_path / "p.txt", tmp_path / "train.txt", tmp_path / "checks.jsonl"
    prompt.write_text("You are the ferry company's assistant. Tickets cost 14 euros. " * 4)
    train.write_text("".join(f"question number {i}?\n" for i in range(5)))
    checks.write_text('{"query": "How much is a ticket?", "contains": ["14"]}\n')
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"output_dir={run}", "num_gist=2"])
    compress.prepare(cfg, str(prompt), str(train), 0, 4, 0.2, None, str(checks))

    def inputs(name):
        lines = (run / "compress_data" / f"{name}.jsonl").read_text().splitlines()
        return [json.loads(line)["input"] for line in lines]

    assert inputs("train") == [f"question number {i}?" for i in range(4)]  # the last of 5 is the 0.2 share
    assert inputs("heldout") == ["question number 4?", "How much is a ticket?"]
    assert read_checks(run / "compress_data" / "checks.jsonl") == read_checks(checks)
    assert json.loads((run / "compress_data" / "prompt.json").read_text())["checks"] == 1
    checks.write_text('{"query": "question number 2?", "contains": ["14"]}\n')
    with pytest.raises(DataError, match=r"1 held-out queries are also training queries .*'question number 2\?'"):
        compress.prepare(cfg, str(prompt), str(train), 0, 4, 0.2, None, str(checks))


def _fidelity_rows(student_kl: float, spread: float = 0.05, n: int = 6) -> list[dict]:
    """Held-out query rows whose student KL is student_kl on average, each query off by +-spread."""
    row = {"answer_tokens": 10, "student_agreeing": 9, "baseline_agreeing": 7, "student_exact_match": 0.0}
    row |= {"baseline_exact_match": 0.0, "student_rougeL": 0.6, "baseline_rougeL": 0.3, "baseline_kl_sum": 3.0}
    return [{**row, "student_kl_sum": 10 * (student_kl + spread * (-1) ** i)} for i in range(n)]


def test_kl_intervals_pool_tokens_and_the_gain_over_no_prompt_is_paired():
    ci = query_intervals(_fidelity_rows(0.1))
    low, high = ci["student_kl"]
    assert 0.05 <= low < 0.1 < high <= 0.15 and ci["baseline_kl"] == [0.3, 0.3]
    assert 0.15 < ci["kl_gain"][0] < 0.2 < ci["kl_gain"][1] < 0.25 and ci["agreement_gain"] == pytest.approx([0.2, 0.2])


@pytest.mark.parametrize(
    "student_kl, spread, warned", [(0.1, 0.05, None), (0.31, 0.05, "further from"), (0.28, 0.1, "not measurably")]
)
def test_the_verdict_warns_when_the_artifact_is_not_better_than_no_prompt(student_kl, spread, warned):
    rows = _fidelity_rows(student_kl, spread)
    tokens = sum(r["answer_tokens"] for r in rows)
    result = {
        "records": len(rows),
        "num_gist": 8,
        "prompt_tokens": 393,
        "student_agreement": 0.9,
        "baseline_agreement": 0.7,
        "student_kl": sum(r["student_kl_sum"] for r in rows) / tokens,
        "baseline_kl": 0.3,
        "student_answer_rougeL": 0.6,
        "baseline_answer_rougeL": 0.3,
        "intervals_95": query_intervals(rows),
        "checks": check_rates(
            [{"teacher_passed": True, "student_passed": i % 2 == 0, "baseline_passed": False} for i in range(4)],
            ("teacher", "student", "baseline"),
        ),
    }
    line, warning = verdict(result)
    assert line.startswith("fidelity on 6 held-out queries, 8 tokens for a 393-token prompt: agreement 90.0%")
    assert "checks passed (of 4): teacher 100.0%, student 50.0% [" in line and "no prompt 0.0%" in line
    assert (warning is None) if warned is None else (warned in warning and "than no prompt at all" in warning)


def test_check_rates_give_the_student_gap_to_the_teacher_with_an_interval():
    rows = [{"teacher_passed": True, "student_passed": i < 3} for i in range(4)]
    rates = check_rates(rows, ("teacher", "student"))
    assert rates["teacher_pass_rate"] == 1.0 and rates["student_pass_rate"] == 0.75
    assert rates["student_minus_teacher"] == -0.25 and rates["student_minus_teacher_95"][0] <= -0.25 <= 0


def test_the_default_compress_config_is_the_measured_recipe():
    cfg = load_config(compress.DEFAULT_CONFIG, ["num_gist=8"])
    assert (cfg.objective, cfg.num_gist, cfg.model.name) == ("distill", 8, "smollm2")
    assert cfg.distill.params == "offsets" and cfg.train.lr == 0.05 and cfg.train.max_steps == 200
