"""distill.params=kv: the gist positions' keys and values at every layer are what trains (prefix tuning),
so what is trained is what the gist cache keeps.

On the tiny model first: step 0 equals the untrained gist cache (the frozen model's own entries for the
gist tokens read after the prompt), and only the k_proj / v_proj outputs at the gist positions change.
Then a real 2-rank ZeRO-3 run (every parameter partitioned): only the keys and values train, the backbone
stays bit for bit, the artifact's cache gives the logits of the training forward, cached generation equals
uncached, resume is exact, and what cannot take a kv artifact refuses it in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import resume_at_the_checkpoint_is_exact

from conftest import TINY, gist_dist, torchrun
from gist_dist import artifact
from gist_dist.analysis.strategies import forward_after
from gist_dist.config import load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.inference import GistKVCache, GistModel, build_cache, generate_uncached, greedy
from gist_dist.masks import model_inputs
from gist_dist.methods import Tokens, method_for
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import GistEmbedding, add_gist_tokens, mean_embedding

STEPS, SAVE_EVERY, K = 8, 4, 2
ARGS = [
    "objective=distill",
    "distill.student=no_prompt",
    f"num_gist={K}",
    "distill.params=kv",
    "train.lr=0.01",
    f"train.max_steps={STEPS}",
    f"train.save_every={SAVE_EVERY}",
]
PROMPT = "You are the ferry company's assistant. Tickets cost 14 euros, the first boat leaves at 07:10."


def _student_logits(model, rows, ids: list[int], gist_ids, last: int) -> torch.Tensor:
    """The student's training forward (gist rows spliced, gist mask): logits of the last `last` tokens."""
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    inputs = model_inputs(batch, gist_ids, "gist")
    inputs["inputs_embeds"] = rows(inputs.pop("input_ids"), model.get_input_embeddings())
    return model(**inputs).logits[0, -last:]


def test_step_zero_is_the_untrained_gist_cache():
    cfg = load_config(TINY, ARGS)
    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, K)
    method = method_for(cfg)(cfg, Tokens(tok, gist_ids, num_old, tok.pad_token_id), torch.float32)
    template = GistTemplate(tok, gist_ids, 256)
    records = [{"instruction": PROMPT, "input": f"question {i}?", "output": "an answer"} for i in range(4)]
    method.encode(template, records, None, "train")
    model = load_model(cfg.model, vocab_min=num_old).eval()
    # the untrained gist cache: the frozen model reads prompt + gist (mean rows) under the gist mask
    plain = GistEmbedding(gist_ids, mean_embedding(model).expand(K, -1))
    prompt, tail, answer = template.pieces(records[1])
    untrained = build_cache(
        model, [prompt + gist_ids], gist_ids, "gist", embed=lambda ids: plain(ids, model.get_input_embeddings())
    )
    with torch.no_grad():
        reference = forward_after(model, tail + answer, untrained, logits_to_keep=len(tail + answer)).logits[0]
        before = _student_logits(model, plain, template.prefix + gist_ids + tail + answer, gist_ids, len(tail + answer))
    module, trainable = method.wrap(model)
    rows = module.gist_rows
    assert trainable == list(rows.kv.parameters()) and not rows.gist.requires_grad
    assert [tuple(p.shape) for p in trainable] == [(K, 32)] * 4  # keys and values of 2 layers (2 kv heads x 16)
    with torch.no_grad():
        student = _student_logits(model, rows, template.prefix + gist_ids + tail + answer, gist_ids, len(tail + answer))
        teacher_like = model(input_ids=torch.tensor([prompt + tail + answer])).logits[0, -1]  # no gist: hooks idle
    torch.testing.assert_close(student, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student, before, atol=1e-3)  # without the entries the gist alone knows no prompt
    assert torch.equal(
        teacher_like,
        load_model(cfg.model, vocab_min=num_old).eval()(input_ids=torch.tensor([prompt + tail + answer])).logits[0, -1],
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gist_kv")
    torchrun(["train", TINY, f"output_dir={out}", *ARGS])
    return out


def test_only_the_keys_and_values_train_and_the_artifact_is_the_cache(run):
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    layers, kv_dim = 2, 32  # configs/models/tiny.yaml: 2 kv heads x 16
    assert log[0]["trainable_params"] == layers * 2 * K * kv_dim
    assert log[-2]["eval_loss"] < log[0]["eval_loss_before"]  # the KL to the teacher falls
    assert log[-1]["frozen_digest_before"] == log[-1]["frozen_digest_after"]  # the backbone, bit for bit
    saved = load_file(str(run / artifact.WEIGHTS))
    assert saved["kv"].shape == (layers, 2, K, kv_dim)
    assert json.loads((run / artifact.CONFIG).read_text())["params"] == "kv"
    cache = GistKVCache.load(run / artifact.CACHE)
    assert cache.length == K and [tuple(k.shape) for k in cache.keys] == [(1, 2, K, 16)] * layers


def test_the_cache_gives_the_logits_of_the_training_forward_and_cached_equals_uncached(run):
    gm = GistModel.load(run)
    cache = GistKVCache.load(run / artifact.CACHE)
    template = GistTemplate(gm.tok, gm.run.gist_ids, max_length=1 << 20)
    for record in load_records("generated:unseen", n=3):
        _, tail, answer = template.pieces(record)
        head = template.prefix + gm.run.gist_ids
        trained = gm.logits(head + tail + answer)[-len(tail + answer) :]
        served = forward_after(gm.model, tail + answer, cache, logits_to_keep=len(tail + answer)).logits[0]
        torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-5)
    pieces = [template.pieces(r) for r in load_records("generated:seen", n=4)]
    prompts, tails = [template.prefix + gm.run.gist_ids for _ in pieces], [t for _, t, _ in pieces]
    args = (gm.run.gist_ids, "gist", 8, gm.tok.eos_token_id)
    cached, _ = greedy(gm.model, prompts, tails, *args, gm.tok.pad_token_id, embed=gm.run.embed)
    assert cached == generate_uncached(gm.model, prompts, tails, *args, embed=gm.run.embed)


def test_resume_is_exact(run, tmp_path):
    resume_at_the_checkpoint_is_exact(run, f"step{SAVE_EVERY:08d}", tmp_path / "resumed", ARGS, ("kv",))


def test_export_refuses_a_kv_artifact_in_one_line(run, tmp_path):
    proc = gist_dist(["export", str(run), "--prompt-embeds", str(tmp_path / "e.safetensors")], check=False)
    assert proc.returncode != 0 and "distill.params=kv" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "e.safetensors").exists()
