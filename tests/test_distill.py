"""Distill mode under 2-rank ZeRO-3: only the gist embeddings learn, the backbone stays bit-for-bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, gist_dist, torchrun
from gist_dist import artifact
from gist_dist.config import ModelConfig
from gist_dist.data.datagen import generate
from gist_dist.inference import GistModel
from gist_dist.model import load_model


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    torchrun(
        ["train", TINY, "objective=distill", "num_gist=2", f"output_dir={out}", "train.lr=0.01", "train.max_steps=30"]
    )
    return out


def test_kl_falls_and_only_gist_trains(distill_run):
    log = rows(distill_run)
    start, end = log[0], log[-1]
    steps = [r for r in log if "step" in r]
    assert start["trainable_params"] == 2 * 64  # k x hidden, nothing else
    assert start["optimizer_state_bytes"] == 2 * 4 * 2 * 64
    assert steps[-1]["eval_loss"] < start["eval_loss_before"]  # KL(teacher || student) on held-out data
    assert end["event"] == "end"
    assert end["frozen_digest_before"] == end["frozen_digest_after"]  # every gathered weight, bit for bit


def test_artifact_and_trained_embeddings_changed(distill_run):
    meta = json.loads((distill_run / artifact.CONFIG).read_text())
    gist = load_file(str(distill_run / artifact.WEIGHTS))["gist"]
    assert gist.shape == (2, 64) and meta["num_gist"] == 2 and meta["gist_tokens"] == ["<GIST_0>", "<GIST_1>"]
    base = load_model(ModelConfig(name="configs/models/tiny.yaml"), vocab_min=49152)
    init = base.get_input_embeddings().weight.mean(0)
    assert not torch.allclose(gist[0], init, atol=1e-3)
    assert meta["base_fingerprint"] == artifact.model_fingerprint(base.config, base.get_input_embeddings().weight)


def test_artifact_round_trip_gives_identical_logits(distill_run, tmp_path):
    gm = GistModel.load(distill_run)
    ids = gm.prompt_ids("apple river", instruction="Reverse the order of the words.")
    before = gm.logits(ids)
    artifact.save(tmp_path, gm.run.gist, gm.meta)
    again = GistModel.load(tmp_path)
    assert torch.equal(before, again.logits(ids))


def test_wrong_base_model_fails_clearly(distill_run, tmp_path):
    other = tmp_path / "other.yaml"
    shape = open(TINY.replace("tiny.yaml", "models/tiny.yaml")).read()
    other.write_text(shape.replace("num_hidden_layers: 2", "num_hidden_layers: 3"))
    proc = gist_dist(["generate", "--gist", str(distill_run), "--model", str(other), "--query", "hi"], check=False)
    assert proc.returncode == 1
    assert "trained for base model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("mask_prefix, params", [("hidden", "embeddings"), ("visible", "offsets"), ("hidden", "kv")])
def test_compress_one_prompt_end_to_end(tmp_path, mask_prefix, params):
    """visible: the chat header before the gist (SmolLM2's tokenizer: its system turn's opening)
    stays visible to the queries in training, and the artifact tells inference so. With
    distill.params=offsets or kv the artifact carries them and generate / fidelity use it. A task check's query
    is held out and scored for teacher, student and no prompt; the run ends with the verdict line."""
    prompt, checks = tmp_path / "system.txt", tmp_path / "checks.jsonl"
    checks.write_text('{"query": "Which task is this?", "regex": "\\\\w"}\n')
    task = generate(1, "seen", seed=5)[0]
    prompt.write_text("You are a helpful assistant. " * 12 + task["instruction"])
    out = tmp_path / "run"
    proc = torchrun(
        [
            "compress",
            "--checks",
            checks,
            "--prompt-file",
            prompt,
            "--num-gist",
            "2",
            "--num-queries",
            "16",
            "--answer-tokens",
            "6",
            "--config",
            TINY,
            f"output_dir={out}",
            "train.max_steps=8",
            "train.lr=0.05",
            f"mask_prefix={mask_prefix}",
            f"distill.params={params}",
        ]
    )
    meta = json.loads((out / artifact.CONFIG).read_text())
    assert meta["params"] == params
    assert set(load_file(str(out / artifact.WEIGHTS))) == {"gist", *artifact.EXTRA[params]}
    assert (out / artifact.CACHE).is_file() is (params == "kv")
    gm = GistModel.load(out)
    header = gm.template.prefix
    assert meta["template"] != "alpaca" and header  # the chat template: a header precedes the gist
    assert meta["mask_prefix_tokens"] == gm.run.prefix == (len(header) if mask_prefix == "visible" else 0)
    assert meta["prompt_tokens"] > 60 and meta["compression_ratio"] == meta["prompt_tokens"] / 2
    assert len(meta["prompt_sha256"]) == 64
    held = (out / "compress_data" / "heldout.jsonl").read_text().splitlines()
    train = (out / "compress_data" / "train.jsonl").read_text().splitlines()
    assert held and not set(held) & set(train)
    answer = gist_dist(["generate", "--gist", str(out), "--query", "what now?", "--max-new-tokens", "4"])
    assert answer.returncode == 0 and answer.stdout.strip()
    end = rows(out)[-1]
    assert end["teacher_cache"]["hits"] > 0  # examples stay on their rank, so epoch 2 on hits the cache
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["records"] == len(held) and fidelity["compression_ratio"] == meta["compression_ratio"]
    for who in ("student", "baseline"):
        assert 0 <= fidelity[f"{who}_agreement"] <= 1 and fidelity[f"{who}_kl"] >= 0
    assert any(json.loads(line)["input"] == "Which task is this?" for line in held)
    assert fidelity["checks"]["checks"] + fidelity["checks"]["unscored_empty_teacher_answer"] == 1
    assert f"compress: {fidelity['verdict']}" in proc.stdout.splitlines()
    assert (fidelity["warning"] is None) == ("WARNING" not in proc.stderr)
    assert "compress: 2 gist " in proc.stdout and "answered" in proc.stdout  # the plan and progress


def test_teacher_cache_gives_the_same_loss():
    """Cached teacher rows (kept in bf16) reproduce the uncached distillation loss."""
    from gist_dist.data import GistTemplate, pad_batch
    from gist_dist.masks import model_inputs
    from gist_dist.methods.distill import DistillLoss
    from gist_dist.model import load_tokenizer
    from gist_dist.tokens import add_gist_tokens

    tok = load_tokenizer(ModelConfig(name="smollm2"))
    n = len(tok)
    gist_ids = add_gist_tokens(tok, 1)
    model = load_model(ModelConfig(name="configs/models/tiny.yaml"), vocab_min=n)
    init = model.get_input_embeddings().weight.mean(0, keepdim=True)
    plain, cached = (DistillLoss(model, gist_ids, init, cache_teacher=c) for c in (False, True))
    template = GistTemplate(tok, gist_ids, 64)
    recs = generate(3, "seen", seed=1)
    t = pad_batch([template.encode(r, with_gist=False) for r in recs], tok.pad_token_id)
    s = pad_batch([template.encode(r) for r in recs], tok.pad_token_id)
    kw = dict(
        teacher=model_inputs(t, gist_ids, "pos_control"),
        student=model_inputs(s, gist_ids, "gist"),
        labels_t=t["labels"],
        labels_s=s["labels"],
    )
    keys = ["a", "b", "c"]
    want = plain(**kw)
    first, second = cached(**kw, keys=keys), cached(**kw, keys=keys)
    assert len(cached.teacher_cache.rows) == 3
    assert torch.equal(first, want)
    assert torch.allclose(second, want, rtol=2e-2)


def test_truncated_teacher_and_student_keep_the_same_answer_tokens():
    """With max_length biting, the teacher (full prompt) loses more answer tokens than the
    student; both must keep the same ones or the KL would compare different tokens."""
    from gist_dist.config import RunConfig
    from gist_dist.data import IGNORE, GistTemplate
    from gist_dist.methods import Tokens
    from gist_dist.methods.distill import Distill
    from gist_dist.model import load_tokenizer
    from gist_dist.tokens import add_gist_tokens

    tok = load_tokenizer(ModelConfig(name="smollm2"))
    gist_ids = add_gist_tokens(tok, 2)
    rec = {"instruction": "Explain this carefully. " * 8, "input": "x", "output": "word " * 60}
    for student in ("no_prompt", "gist_mask"):  # student head shorter, then longer, than the teacher's
        cfg = RunConfig(objective="distill")
        cfg.distill.student = student
        method = Distill(cfg, Tokens(tok, gist_ids, len(tok) - 2, tok.pad_token_id), torch.float32)
        (ex,) = method.encode(GistTemplate(tok, gist_ids, 48), [rec], None, "train")
        answer = [
            [i for i, lab in zip(e["input_ids"], e["labels"]) if lab != IGNORE] for e in (ex["teacher"], ex["student"])
        ]
        assert answer[0] == answer[1] and 0 < len(answer[0]) < 60


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_artifact_trained_in_fp32_loads_onto_a_base_in_another_dtype(distill_run, dtype):
    """The fingerprint is the same whatever dtype the base is loaded in (GPU artifacts load on CPU boxes)."""
    base = load_model(ModelConfig(name="configs/models/tiny.yaml", dtype=dtype), vocab_min=49152)
    gist, _ = artifact.load(
        distill_run, expected_fingerprint=artifact.BaseModel(base.config, base.get_input_embeddings().weight)
    )
    assert gist.shape == (2, 64)
    other = load_model(ModelConfig(name="configs/models/tiny.yaml", dtype=dtype, seed=1), vocab_min=49152)
    with pytest.raises(artifact.ArtifactError, match="trained for base model"):
        artifact.load(
            distill_run, expected_fingerprint=artifact.BaseModel(other.config, other.get_input_embeddings().weight)
        )


def test_artifact_with_a_fingerprint_of_an_unknown_format_is_refused(tmp_path):
    base = load_model(ModelConfig(name="configs/models/tiny.yaml"), vocab_min=49152)
    weight = base.get_input_embeddings().weight
    artifact.save(tmp_path, torch.zeros(1, 64), {"num_gist": 1, "base_fingerprint": "0" * 64})
    with pytest.raises(artifact.ArtifactError, match="trained for base model"):
        artifact.load(tmp_path, expected_fingerprint=artifact.BaseModel(base.config, weight))


@pytest.mark.parametrize("template", ["alpaca", "chat_system"])
@pytest.mark.parametrize("student", ["gist_mask", "no_prompt"])
def test_visible_prefix_of_the_student_is_the_template_text_every_record_shares(template, student):
    """mask_prefix=visible for distill: the student keeps visible what precedes the instruction (the
    fixed head) or, with no prompt, what precedes the gist (BOS / the chat header): the same tokens
    for every record, and the collated student mask lets every post-gist query see exactly those."""
    from gist_dist.config import RunConfig
    from gist_dist.data import GistTemplate
    from gist_dist.methods import Tokens
    from gist_dist.methods.distill import Distill
    from gist_dist.model import load_tokenizer
    from gist_dist.tokens import add_gist_tokens

    tok = load_tokenizer(ModelConfig(name="smollm2"))
    gist_ids = add_gist_tokens(tok, 1)
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Spell cat backwards, please.", "input": "cat", "output": "tac"},
    ]
    t = GistTemplate(tok, gist_ids, 256, template=template)
    cfg = RunConfig(objective="distill", mask_prefix="visible")
    cfg.distill.student = student
    method = Distill(cfg, Tokens(tok, gist_ids, len(tok) - 1, tok.pad_token_id), torch.float32)
    examples = method.encode(t, records, None, "train")
    shared = t.fixed_head if student == "gist_mask" else t.prefix
    assert method.prefix == len(shared) and (student == "gist_mask" or template != "alpaca" or not shared)
    for ex in examples:
        assert ex["student"]["input_ids"][: method.prefix] == shared
    batch, _ = method.collate(examples, torch.device("cpu"))
    ids, mask = batch["student"]["input_ids"], batch["student"]["attention_mask"][:, 0]  # right-padded rows
    for row in range(len(examples)):
        g = max(i for i in range(ids.shape[1]) if int(ids[row, i]) == gist_ids[-1])
        seen = {k for k in range(ids.shape[1]) if mask[row, g + 1, k] == 0}  # the first query after the gist
        assert seen == set(range(method.prefix)) | {g, g + 1}
