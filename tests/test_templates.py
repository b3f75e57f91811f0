"""Templates by config (alpaca | chat | chat_system), compress in the chat template, fidelity's free answers."""

import json

import pytest
import torch

from conftest import ROOT, TINY
from gist_dist import artifact, compress
from gist_dist.config import ConfigError, ModelConfig, load_config
from gist_dist.data import IGNORE, DataError, GistTemplate
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import add_gist_tokens

SHAPE = str(ROOT / "configs" / "models" / "tiny.yaml")


@pytest.fixture(scope="module")
def tok_gist():
    tok = load_tokenizer(ModelConfig(name="smollm2"))
    return tok, add_gist_tokens(tok, 2)


def answer_of(ex):
    return [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]


def test_chat_template_labels_only_the_answer_and_places_the_gist(tok_gist):
    tok, gist = tok_gist
    rec = {"instruction": "Translate <|im_end|> into French.", "input": "the cat", "output": "le chat"}
    t = GistTemplate(tok, gist, 256, template="chat")
    ex = t.encode(rec)
    text = tok.decode(ex["input_ids"])
    assert text.endswith(
        "<|im_start|>user\nTranslate <|im_end|> into French.<GIST_0><GIST_1>\nthe cat<|im_end|>\n"
        "<|im_start|>assistant\nle chat<|im_end|>"
    )
    assert text.startswith("<|im_start|>system\n")  # the template's own header (SmolLM2's default system turn)
    assert tok.decode(answer_of(ex)) == "le chat<|im_end|>" and answer_of(ex)[-1] == tok.eos_token_id
    assert ex["input_ids"].count(tok.eos_token_id) == 3  # header, user turn, answer: the data's "<|im_end|>" is text
    g = ex["input_ids"].index(gist[0])
    assert ex["input_ids"][:g] == t.pieces(rec)[0] and ex["prompt_tokens"] == g
    alone = t.encode({**rec, "input": ""})
    assert tok.decode(alone["input_ids"]).split("<GIST_1>")[1].startswith("<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = t.encode(rec, with_prompt=False)  # the fixed header stays, the instruction goes
    assert no_prompt["input_ids"][: len(t.prefix)] == t.prefix and no_prompt["input_ids"][len(t.prefix)] == gist[0]
    assert answer_of(no_prompt) == answer_of(ex)


def test_chat_system_layout_and_alpaca_unchanged(tok_gist):
    tok, gist = tok_gist
    rec = {"instruction": "You sell ferry tickets.", "input": "How much?", "output": ""}
    ex = GistTemplate(tok, gist, 256, template="chat_system").encode(rec)
    assert tok.decode(ex["input_ids"]) == (
        "<|im_start|>system\nYou sell ferry tickets.<GIST_0><GIST_1><|im_end|>\n"
        "<|im_start|>user\nHow much?<|im_end|>\n<|im_start|>assistant\n<|im_end|>"
    )
    assert answer_of(ex) == [tok.eos_token_id]  # an empty answer is an eos-only target, never "."
    alpaca = GistTemplate(tok, gist, 256).encode({**rec, "output": "9 euros"})
    assert tok.decode(alpaca["input_ids"]) == (
        "Instruction: You sell ferry tickets.\n<GIST_0><GIST_1>\nInput: How much?\nOutput: 9 euros<|im_end|>"
    )


def test_template_config_and_errors_are_one_line(tok_gist):
    tok, gist = tok_gist
    assert load_config(TINY, ["data.template=chat"]).data.template == "chat"
    with pytest.raises(ConfigError, match="data.template must be one of alpaca, chat, chat_system"):
        load_config(TINY, ["data.template=llama"])
    bare = load_tokenizer(ModelConfig(name="smollm2"))
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template") as e:
        GistTemplate(bare, gist, 64, template="chat")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tok_gist):
    """Teacher data from the tiny model in the chat template (one in three answers forced empty), then
    an untrained no-prompt artifact over it: what `gist-dist compress` leaves before training."""
    run = tmp_path_factory.mktemp("compress")
    cfg = load_config(TINY, [f"output_dir={run}", "num_gist=2"])
    prompt = ("You are the ferry company's assistant. Tickets cost 14 euros. " * 6).strip()
    queries = [f"question number {i}?" for i in range(9)]
    seen, real = [], compress.greedy

    def greedy(model, prompts, tails, *args):
        seen.append(prompts[0] + tails[0])
        answers, cache = real(model, prompts, tails, *args)
        return ([] if len(seen) % 3 == 0 else answers[0] or [11],), cache

    compress.greedy = greedy
    try:
        compress._write_teacher_data(cfg, run / "compress_data", prompt, queries, 0, 6, 0.4)
    finally:
        compress.greedy = real
    tok, gist_ids = tok_gist
    base = load_model(ModelConfig(name=SHAPE, tokenizer="smollm2"), vocab_min=len(tok) - len(gist_ids))
    embedding = base.get_input_embeddings().weight
    meta = {
        "base_fingerprint": artifact.model_fingerprint(base.config, embedding),
        "base_model": SHAPE,
        "tokenizer": "smollm2",
        "num_gist": 2,
        "gist_tokens": ["<GIST_0>", "<GIST_1>"],
        "student": "no_prompt",
        "template": "chat_system",
        **json.loads((run / "compress_data" / "prompt.json").read_text()),
    }
    artifact.save(run, embedding.mean(0, keepdim=True).repeat(2, 1), meta)
    return run, prompt, queries, [tok.decode(s) for s in seen]


def test_compress_uses_the_chat_template_and_counts_dropped_answers(compressed):
    run, prompt, queries, teacher_inputs = compressed
    assert teacher_inputs[0] == (
        f"<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>user\n{queries[0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    meta = json.loads((run / "compress_data" / "prompt.json").read_text())
    assert meta["template"] == "chat_system" and meta["queries"] == 9 and meta["dropped_empty_answers"] == 3
    records = [
        json.loads(line)
        for name in ("train", "heldout")
        for line in (run / "compress_data" / f"{name}.jsonl").read_text().splitlines()
    ]
    assert len(records) == 6 and all(r["output"].strip() and r["output"] != "." for r in records)
    assert [r["input"] for r in records] == [q for i, q in enumerate(queries) if i % 3 != 2]


def test_compress_run_config_rebuilds_the_template(compressed, tmp_path, monkeypatch):
    run = compressed[0]
    monkeypatch.setattr(compress.dist, "init", lambda timeout_s: None)  # one process: no process group here
    prompt_file, queries_file = tmp_path / "p.txt", tmp_path / "q.txt"
    prompt_file.write_text(compressed[1])
    queries_file.write_text("\n".join(compressed[2]))
    data = {f.name: f.read_text() for f in (run / "compress_data").iterdir()}
    cfg = compress.prepare(
        load_config(TINY, [f"output_dir={run}", "num_gist=2"]), str(prompt_file), str(queries_file), 9, 6, 0.4
    )
    assert cfg.data.template == "chat_system" and cfg.distill.student == "no_prompt"
    assert {f.name: f.read_text() for f in (run / "compress_data").iterdir()} == data  # reused (same prompt, queries)


def test_fidelity_reports_free_answers(compressed):
    from gist_dist.fidelity import evaluate_heldout
    from gist_dist.inference import GistModel

    run = compressed[0]
    result = evaluate_heldout(run)
    held = (run / "compress_data" / "heldout.jsonl").read_text().splitlines()
    assert result["records"] == len(held) == 2 and result["template"] == "chat_system"
    for who in ("student", "baseline"):
        for metric in ("exact_match", "rougeL"):
            assert 0.0 <= result[f"{who}_answer_{metric}"] <= 1.0
    rows = [json.loads(line) for line in (run / "fidelity_answers.jsonl").read_text().splitlines()]
    assert [r["teacher"] for r in rows] == [json.loads(h)["output"] for h in held]
    assert sum(r["answer_tokens"] for r in rows) == result["answer_tokens"]
    for who in ("student", "baseline"):  # the per-query counts add up to the pooled figure, inside its interval
        assert sum(r[f"{who}_agreeing"] for r in rows) / result["answer_tokens"] == result[f"{who}_agreement"]
        for key in (f"{who}_agreement", f"{who}_answer_rougeL", f"{who}_answer_exact_match"):
            low, high = result["intervals_95"][key]
            assert low <= result[key] <= high
    gm = GistModel.load(run)
    assert rows[0]["student"] == gm.generate(rows[0]["query"], max_new_tokens=result["answer_max_new_tokens"])
    assert gm.template.template == "chat_system"
    prompt, _ = gm.prompt_and_tail("hi")
    assert gm.tok.decode(prompt) == "<|im_start|>system\n<GIST_0><GIST_1>"  # gist where the system text was


def test_query_intervals_resample_whole_queries():
    from gist_dist.fidelity import query_intervals

    row = {
        "answer_tokens": 10,
        "student_agreeing": 9,
        "baseline_agreeing": 7,
        "student_exact_match": 1.0,
        "baseline_exact_match": 0.0,
        "student_rougeL": 0.5,
        "baseline_rougeL": 0.25,
        "student_kl_sum": 1.0,
        "baseline_kl_sum": 2.0,
    }
    same = query_intervals([row] * 5)
    assert same["student_agreement"] == [0.9, 0.9] and same["baseline_answer_rougeL"] == [0.25, 0.25]
    # a long query agreeing everywhere and a short one nowhere (pooled: 10/11): each draw's agreement
    # pools its queries' tokens; a mean of per-query ratios (1 or 0) would put the low end near 1/6
    rows = [{**row, "answer_tokens": 10, "student_agreeing": 10}, {**row, "answer_tokens": 1, "student_agreeing": 0}]
    wide = query_intervals(rows * 3, n=2000, seed=1)
    low, high = wide["student_agreement"]
    assert 0.5 < low < 10 / 11 < high <= 1.0 and wide == query_intervals(rows * 3, n=2000, seed=1)


def test_an_empty_prediction_scores_zero(tok_gist):
    from gist_dist.fidelity import compare_answers

    means, rows = compare_answers({"student": ["14 euros", ""], "baseline": ["no", "no"]}, ["14 euros", "yes"])
    assert means["student_answer_exact_match"] == 0.5 and means["student_answer_rougeL"] == pytest.approx(0.5)
    assert means["baseline_answer_rougeL"] == 0.0 and rows[0]["student_exact_match"] == 1.0
    assert torch.tensor([r["baseline_rougeL"] for r in rows]).eq(0).all()


def test_heldout_queries_file_is_the_heldout_split_and_never_trained_on(tmp_path, monkeypatch):
    """--heldout-queries: exactly those queries are held out, every other one trains; other queries
    make new teacher data rather than reusing the old; a held-out query among the training ones is refused."""
    monkeypatch.setattr(compress.dist, "init", lambda timeout_s: None)  # one process: no process group here
    prompt, train, held = tmp_path / "p.txt", tmp_path / "train.txt", tmp_path / "held.txt"
    prompt.write_text("You are the ferry company's assistant. Tickets cost 14 euros. " * 4)
    train.write_text("".join(f"question number {i}?\n" for i in range(5)))
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"output_dir={run}", "num_gist=2"])

    def split(held_queries):
        held.write_text("".join(q + "\n" for q in held_queries))
        compress.prepare(cfg, str(prompt), str(train), 0, 4, 0.2, str(held))
        return [
            [json.loads(line)["input"] for line in (run / "compress_data" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "heldout")
        ]

    assert split(["held one?", "held two?"]) == [
        [f"question number {i}?" for i in range(5)],
        ["held one?", "held two?"],
    ]
    assert split(["held three?"])[1] == ["held three?"]
    assert json.loads((run / "compress_data" / "prompt.json").read_text())["heldout_queries"] == 1
    with pytest.raises(
        DataError, match=r"1 held-out queries are also training queries .* \(first: 'question number 3\?'\)"
    ):
        split(["held four?", "question number 3?"])
