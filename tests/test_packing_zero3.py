"""Packed 2-rank ZeRO-3 runs of configs/tiny.yaml, a fine-tune and a distill: the loss falls and resume
is bit-exact. For the fine-tune, the logged step loss and the gradient are those of the mean over the
target tokens of the whole global batch (2 ranks x 2 micro-batches), checked against one process
computing them from the same rows and initial weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, torchrun
from gist_dist.config import load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.data.batches import ShardedBatches
from gist_dist.masks import model_inputs
from gist_dist.methods import METHODS, Tokens
from gist_dist.methods.base import to_device
from gist_dist.methods.finetune import labelled_rows, lm_head_rows
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import add_gist_tokens, init_gist_embeddings

STEPS, SAVE_EVERY = 6, 3
ARGS = [
    "data.packing=true",
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "train.lr=1e-3",
    f"train.max_steps={STEPS}",
    f"train.save_every={SAVE_EVERY}",
    "train.eval_every=3",
]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


DISTILL_ARGS = ["objective=distill", "num_gist=2", "train.lr=1e-2"]  # teacher and student rows packed alike


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    torchrun(["train", TINY, f"output_dir={out}", *ARGS])
    return out


@pytest.fixture(scope="module")
def packed_distill_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed_distill")
    torchrun(["train", TINY, f"output_dir={out}", *ARGS, *DISTILL_ARGS])
    return out


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_packed_run_learns_and_resumes_bit_exactly(kind, request, tmp_path):
    packed_run = request.getfixturevalue("packed_run" if kind == "finetune" else "packed_distill_run")
    args = ARGS + (DISTILL_ARGS if kind == "distill" else [])
    steps = {r["step"]: r for r in rows(packed_run) if "step" in r}
    assert steps[STEPS]["eval_loss"] < rows(packed_run)[0]["eval_loss_before"]
    tag = f"step{SAVE_EVERY:08d}"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(packed_run / "checkpoints" / tag, resumed / "checkpoints" / tag)
    (resumed / "checkpoints" / "latest").write_text(tag)
    torchrun(["train", TINY, f"output_dir={resumed}", *args])
    again = {r["step"]: r for r in rows(resumed) if "step" in r}
    assert sorted(again) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for s in again:
        assert again[s]["loss"] == steps[s]["loss"] and again[s].get("eval_loss") == steps[s].get("eval_loss"), s


def test_step_loss_and_gradient_are_those_of_the_global_batch_mean(packed_run):
    """Recompute step 1 in one process, from the rows both ranks trained on and the initial weights:
    the logged loss is the mean over the target tokens of the global batch, and the gradient DeepSpeed
    stepped with (its norm before clipping, as logged) is the gradient of that mean, not a mean of
    per-micro-batch means nor a sum over ranks."""
    cfg = load_config(TINY, [f"output_dir={packed_run}", *ARGS])
    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    tokens = Tokens(tok, add_gist_tokens(tok, cfg.num_gist), num_old, tok.pad_token_id)
    method = METHODS["finetune"](cfg, tokens, torch.float32)
    template = GistTemplate(tok, tokens.gist_ids, cfg.data.max_length, cfg.data.overlong)
    records = load_records(cfg.data.train, n=cfg.data.num_train, seed=cfg.data.seed)
    packed = method.pack(method.encode(template, records, None, "train"), cfg.data.max_length)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model, vocab_min=num_old)
    init_gist_embeddings(model, tokens.gist_ids, num_old, len(tok))
    total, targets = torch.zeros(()), 0
    for rank in range(2):
        batches = ShardedBatches(packed, cfg.train.micro_batch_size, rank, 2, cfg.train.seed)
        for _ in range(cfg.train.grad_accum):
            b = to_device(next(batches), tok.pad_token_id, torch.device("cpu"))
            inputs = model_inputs(b, tokens.gist_ids, cfg.mask)
            hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
            r, t = labelled_rows(hidden, b["labels"])
            total = total + F.cross_entropy(lm_head_rows(model, r).float(), t, reduction="sum")
            targets += len(t)
    (total / targets).backward()
    reference_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    ).item()
    logged = next(r for r in rows(packed_run) if r.get("step") == 1)
    assert abs(logged["loss"] - total.item() / targets) <= 1e-5 * abs(logged["loss"]), (logged, total / targets)
    assert logged["grad_norm"] == pytest.approx(reference_norm, rel=1e-4)
