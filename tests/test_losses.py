"""The logit-light losses (the LM head runs only on labelled positions, summed over them) equal the
full-logit mean losses once divided by the target tokens."""

import pytest
import torch
import torch.nn.functional as F

from gist_dist.config import ModelConfig
from gist_dist.data import IGNORE, GistTemplate, pad_batch
from gist_dist.data.datagen import generate
from gist_dist.masks import model_inputs
from gist_dist.methods.distill import DistillLoss
from gist_dist.methods.finetune import CausalLMLoss
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import add_gist_tokens, init_gist_embeddings

MODELS = ["configs/models/tiny.yaml", pytest.param("smollm2", marks=pytest.mark.slow)]  # the real model: make test


def _setup(name, num_gist=2):
    tok = load_tokenizer(ModelConfig(name="smollm2"))
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, num_gist)
    model = load_model(ModelConfig(name=name, dtype="fp32"), vocab_min=num_old)
    return tok, num_old, gist_ids, model


def _full_kl(model, t_in, s_in, embeds, labels_t, labels_s, temperature):
    """The distill loss as first written: full [B, T, V] logits, rows picked afterwards."""

    def rows(logits, labels):
        pos = torch.zeros_like(labels, dtype=torch.bool)
        pos[:, :-1] = labels[:, 1:] != IGNORE
        return logits[pos]

    t = rows(model(**t_in).logits, labels_t).float() / temperature
    s_in = {k: v for k, v in s_in.items() if k != "input_ids"}
    s = rows(model(inputs_embeds=embeds, **s_in).logits, labels_s).float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


@pytest.mark.parametrize("name", MODELS)
def test_finetune_loss_equals_hf_loss_and_its_gradients(name):
    tok, num_old, gist_ids, model = _setup(name)
    init_gist_embeddings(model, gist_ids, num_old, len(tok))
    template = GistTemplate(tok, gist_ids, 96)
    batch = pad_batch(template.encode_all(generate(4, "seen", seed=3)), tok.pad_token_id)
    inputs = model_inputs(batch, gist_ids, "gist")
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    ours = CausalLMLoss(model)(**inputs, labels=batch["labels"]) / targets  # the module sums over targets
    ours.backward()
    grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    theirs = model(**inputs, labels=batch["labels"]).loss  # HF: full logits, shifted CE
    theirs.backward()
    assert abs(float(ours.detach()) - float(theirs.detach())) <= 1e-6 * max(1.0, abs(float(theirs)))
    torch.testing.assert_close(
        grad, model.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max())
    )


@pytest.mark.parametrize("lm_weight", [0.0, 0.3])
@pytest.mark.parametrize("name", MODELS)
def test_distill_loss_equals_the_full_logit_loss(name, lm_weight):
    tok, num_old, gist_ids, model = _setup(name)
    init = model.get_input_embeddings().weight.mean(0, keepdim=True).expand(len(gist_ids), -1)
    module = DistillLoss(model, gist_ids, init + 0.01 * torch.randn_like(init), temperature=2.0, lm_weight=lm_weight)
    template = GistTemplate(tok, gist_ids, 96)
    recs = generate(4, "seen", seed=4)
    t = pad_batch([template.encode(r, with_gist=False) for r in recs], tok.pad_token_id)
    s = pad_batch([template.encode(r) for r in recs], tok.pad_token_id)
    t_in, s_in = model_inputs(t, gist_ids, "pos_control"), model_inputs(s, gist_ids, "gist")
    targets = int((s["labels"][:, 1:] != IGNORE).sum())
    ours = module(teacher=t_in, student=s_in, labels_t=t["labels"], labels_s=s["labels"]) / targets
    ours.backward()
    grad = module.gist_rows.gist.grad.clone()
    module.gist_rows.gist.grad = None
    embeds = module.gist_rows(s_in["input_ids"], model.get_input_embeddings())
    want = _full_kl(model, t_in, s_in, embeds, t["labels"], s["labels"], 2.0)
    if lm_weight:
        logits = model(inputs_embeds=embeds, **{k: v for k, v in s_in.items() if k != "input_ids"}).logits
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), s["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        want = (1 - lm_weight) * want + lm_weight * lm
    want.backward()
    assert abs(float(ours.detach()) - float(want.detach())) <= 1e-6 * max(1.0, abs(float(want)))
    # fp32 sums in another order: equal to 1e-5 of the gradient's scale
    torch.testing.assert_close(grad, module.gist_rows.gist.grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))


def test_gist_rows_need_consecutive_ids():
    from gist_dist.tokens import GistEmbedding

    with pytest.raises(ValueError, match="consecutive"):
        GistEmbedding([5, 7], torch.zeros(2, 4))
