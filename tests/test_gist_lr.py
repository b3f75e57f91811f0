"""train.gist_lr: in a fine-tune the gist tokens' input rows train as their own parameter at their own
lr. Checked: before training the split model computes exactly what the plain one does; the gist rows
move at their lr while the vocabulary's gist rows do not; the exported model (rows written back into
the vocabulary) computes the trained module's loss, tied and untied; and a 2-rank ZeRO-3 run's export
reproduces the trainer's own final eval loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, T5, TINY, torchrun
from gist_dist.config import ConfigError, load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.data.batches import ShardedBatches
from gist_dist.methods import METHODS, Tokens, method_for
from gist_dist.methods.finetune import CausalLMLoss, with_gist_rows
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import add_gist_tokens, init_gist_embeddings

GIST_LR = 0.05


def setup(overrides: list[str]):
    cfg = load_config(TINY, overrides)
    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    tokens = Tokens(tok, add_gist_tokens(tok, cfg.num_gist), num_old, tok.pad_token_id)
    method = METHODS["finetune"](cfg, tokens, torch.float32)
    template = GistTemplate(tok, tokens.gist_ids, cfg.data.max_length, cfg.data.overlong, cfg.data.template)
    return cfg, tokens, method, template


def fresh_backbone(cfg, tokens):
    torch.manual_seed(0)
    return load_model(cfg.model, vocab_min=tokens.num_old)


def fresh_model(cfg, tokens):
    """The backbone with the vocabulary's gist rows, as Finetune.wrap makes it."""
    model = fresh_backbone(cfg, tokens)
    init_gist_embeddings(model, tokens.gist_ids, tokens.num_old, len(tokens.tokenizer))
    return model


def untied_shape(tmp_path: Path) -> str:
    shape = yaml.safe_load((ROOT / "configs" / "models" / "tiny.yaml").read_text())
    shape.update(name="tiny-llama-untied", tie_word_embeddings=False)
    path = tmp_path / "tiny-untied.yaml"
    path.write_text(yaml.safe_dump(shape))
    return str(path)


@pytest.mark.parametrize("tied", [True, False])
def test_gist_rows_train_at_their_lr_and_the_export_computes_what_was_trained(tied, tmp_path):
    overrides = [f"train.gist_lr={GIST_LR}", "num_gist=2"] + ([] if tied else [f"model.name={untied_shape(tmp_path)}"])
    cfg, tokens, method, template = setup(overrides)
    records = load_records(cfg.data.train, n=8, seed=0, split="seen")
    batch, _ = method.collate(method.encode(template, records, None, "train"), torch.device("cpu"))
    plain_loss = CausalLMLoss(fresh_model(cfg, tokens))(**batch)

    module, trainable = method.wrap(fresh_backbone(cfg, tokens))
    assert module.model.config.tie_word_embeddings is tied
    torch.testing.assert_close(module(**batch), plain_loss, rtol=1e-6, atol=0)  # the split changes nothing yet
    groups = method.param_groups(module, trainable)
    assert [g.get("lr") for g in groups] == [None, GIST_LR] and groups[1]["params"] == [module.gist_rows.gist]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
    embedding = module.model.get_input_embeddings().weight
    vocab_rows, start = embedding[tokens.gist_ids].detach().clone(), module.gist_rows.gist.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        module(**batch).backward()
        optimizer.step()
    moved = (module.gist_rows.gist - start).abs().max().item()
    assert 0.5 * 3 * GIST_LR < moved <= 3 * GIST_LR * 1.01  # Adam moves each row about lr a step
    if tied:  # the tied vocabulary rows get no gradient: input and output sides use the separate rows
        assert torch.equal(embedding[tokens.gist_ids], vocab_rows)

    exported = fresh_model(cfg, tokens)
    state = {k: v.detach() for k, v in module.model.state_dict().items()}
    exported.load_state_dict(with_gist_rows(module.model, state, tokens.gist_ids, module.gist_rows.gist.detach()))
    with torch.no_grad():
        trained = module(**batch)
        torch.testing.assert_close(CausalLMLoss(exported)(**batch), trained, rtol=1e-6, atol=0)
        assert abs(CausalLMLoss(module.model)(**batch).item() - trained.item()) > 1e-4  # the rows matter


def test_gist_lr_is_refused_where_it_has_no_meaning():
    with pytest.raises(ConfigError, match="train.gist_lr is for objective=finetune"):
        load_config(TINY, ["objective=distill", "train.gist_lr=0.01"])
    with pytest.raises(ConfigError, match="train.gist_lr must be >= 0"):
        load_config(TINY, ["train.gist_lr=-1"])
    with pytest.raises(ConfigError, match="train.gist_lr is not implemented for encoder-decoder"):
        method_for(load_config(T5, ["train.gist_lr=0.01"]))


def test_zero3_run_exports_the_model_it_evaluated(tmp_path):
    """2 ranks, ZeRO-3 (every parameter partitioned, the gist rows too): the final eval loss the trainer
    logged, recomputed in one process from final/ on the same held-out batches, is the same number."""
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"train.gist_lr={GIST_LR}", "train.max_steps=6"]
    torchrun(["train", TINY, *args])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["eval_loss"] for r in log if "eval_loss" in r][-1]
    for r in (r for r in log if "step" in r):  # one schedule (warm-up, cosine), two base lrs
        assert r["gist_lr"] / GIST_LR == pytest.approx(r["lr"] / 3e-3, rel=1e-6)
    assert logged < log[0]["eval_loss_before"]

    cfg, tokens, method, template = setup(args)
    final = load_model(cfg.model.__class__(name=str(out / "final")))
    evals = method.encode(
        template,
        load_records(cfg.data.eval, n=cfg.data.num_eval, seed=cfg.data.seed + 1, split="seen", role="eval"),
        None,
        "eval",
    )
    size = max(1, min(cfg.train.micro_batch_size, len(evals) // 2))  # as Trainer._load_data
    total = targets = 0.0
    with torch.no_grad():
        for rank in range(2):
            batches = ShardedBatches(evals, size, rank, 2, 0, shuffle=False)
            for _ in range(min(cfg.train.eval_batches, batches.per_epoch)):
                examples = next(batches)
                total += float(CausalLMLoss(final)(**method.collate(examples, torch.device("cpu"))[0]))
                targets += method.targets(examples)
    assert total / targets == pytest.approx(logged, rel=1e-5)
