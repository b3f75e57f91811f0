"""distill.params=offsets: a trained offset per decoder layer at the gist positions (deep gist tokens).

First against the definition on the tiny model, then in a real 2-rank ZeRO-3 run of the tiny config
(every parameter partitioned, the offsets too): only the gist rows and offsets train, the backbone
stays bit for bit, the artifact carries the offsets, cached generation equals uncached, resume is exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import resume_at_the_checkpoint_is_exact

from conftest import T5, TINY, gist_dist, torchrun
from gist_dist import artifact
from gist_dist.artifact import ArtifactError
from gist_dist.config import load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.inference import GistModel, generate_uncached, greedy
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import GistEmbedding, GistLayerOffsets, add_gist_tokens

STEPS, SAVE_EVERY, K = 8, 4, 2
ARGS = [
    "objective=distill",
    f"num_gist={K}",
    "distill.params=offsets",
    "train.lr=0.01",
    f"train.max_steps={STEPS}",
    f"train.save_every={SAVE_EVERY}",
]


def test_offset_is_added_to_what_enters_each_layer_at_the_gist_positions_only():
    """What enters the tiny model's second (last) layer moves by exactly each gist token's offset row
    (left-padded rows, gist tokens at different columns) and nowhere else; a later forward that does
    not splice the gist rows in (a teacher, a decoding step) is untouched by the hooks."""
    torch.manual_seed(0)
    cfg = load_config(TINY, [f"num_gist={K}"])
    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, K)
    model = load_model(cfg.model, vocab_min=num_old).eval()
    decoder, hidden = model.get_decoder(), model.config.hidden_size
    plain_logits_before = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    offsets = torch.randn(len(decoder.layers) - 1, K, hidden)
    rows = GistEmbedding(gist_ids, torch.randn(K, hidden), GistLayerOffsets(decoder, offsets))
    seen = []  # what enters the last layer, after the offsets' own pre-hook
    decoder.layers[-1].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    ids = torch.tensor([[0, 11, 12, *gist_ids, 13], [14, 15, 16, 17, *gist_ids]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(inputs_embeds=rows(ids, model.get_input_embeddings()), attention_mask=mask)
        rows.offsets.layers[-1].rows.zero_()
        model(inputs_embeds=rows(ids, model.get_input_embeddings()), attention_mask=mask)
    shifted, base = seen
    expected = torch.zeros_like(base)
    expected[0, 3:5], expected[1, 4:6] = offsets[-1], offsets[-1]
    torch.testing.assert_close(shifted - base, expected, rtol=0, atol=1e-5)
    assert torch.equal(model(input_ids=torch.tensor([[5, 6, 7]])).logits, plain_logits_before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layer_offsets")
    torchrun(["train", TINY, f"output_dir={out}", *ARGS])
    return out


def test_only_gist_rows_and_offsets_train_and_the_artifact_carries_them(run):
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    layers, hidden = 2, 64  # configs/models/tiny.yaml
    assert log[0]["trainable_params"] == K * hidden * layers  # the rows, and one offset per layer after the first
    assert log[-2]["eval_loss"] < log[0]["eval_loss_before"]  # the KL to the teacher falls
    assert log[-1]["frozen_digest_before"] == log[-1]["frozen_digest_after"]  # the backbone, bit for bit
    saved = load_file(str(run / artifact.WEIGHTS))
    assert saved["layer_offsets"].shape == (layers - 1, K, hidden) and saved["layer_offsets"].abs().min() > 0
    assert json.loads((run / artifact.CONFIG).read_text())["params"] == "offsets"


def test_cached_generation_equals_uncached_and_the_offsets_are_used(run, tmp_path):
    gm = GistModel.load(run)
    template = GistTemplate(gm.tok, gm.run.gist_ids, max_length=1 << 20)
    pieces = [template.pieces(r) for r in load_records("generated:unseen", n=4)]
    prompts, tails = [p + gm.run.gist_ids for p, _, _ in pieces], [t for _, t, _ in pieces]
    args = (gm.run.gist_ids, "gist", 8, gm.tok.eos_token_id)
    cached, _ = greedy(gm.model, prompts, tails, *args, gm.tok.pad_token_id, embed=gm.run.embed)
    assert cached == generate_uncached(gm.model, prompts, tails, *args, embed=gm.run.embed)
    # The same gist rows without the offsets score otherwise: inference applies them.
    artifact.save(tmp_path, gm.run.gist, {k: v for k, v in gm.meta.items() if k != "params"})
    ids = prompts[0] + tails[0]
    assert not torch.allclose(gm.logits(ids), GistModel.load(tmp_path).logits(ids))


def test_resume_is_exact(run, tmp_path):
    resume_at_the_checkpoint_is_exact(
        run, f"step{SAVE_EVERY:08d}", tmp_path / "resumed", ARGS, ("gist", "layer_offsets")
    )


def test_artifact_whose_offsets_disagree_with_its_config_is_refused(tmp_path):
    artifact.save(tmp_path, torch.zeros(K, 8), {"num_gist": K}, layer_offsets=torch.zeros(3, K, 8))
    assert artifact.load(tmp_path)[1]["params"] == "offsets"
    config = tmp_path / artifact.CONFIG
    config.write_text(json.dumps({**json.loads(config.read_text()), "params": "embeddings"}))
    with pytest.raises(ArtifactError, match=r"holds .*'layer_offsets': \[3, 2, 8\].* does not match its config"):
        artifact.load(tmp_path)
    artifact.save(tmp_path, torch.zeros(K, 8), {"num_gist": K}, layer_offsets=torch.zeros(3, K, 4))
    with pytest.raises(ArtifactError, match="does not match its config"):
        artifact.load(tmp_path)


def test_export_refuses_offsets_in_one_line(tmp_path):
    artifact.save(
        tmp_path,
        torch.zeros(K, 64),
        {"num_gist": K, "student": "no_prompt", "template": "alpaca", "base_model": "x"},
        layer_offsets=torch.zeros(2, K, 64),
    )
    proc = gist_dist(["export", str(tmp_path), "--prompt-embeds", str(tmp_path / "e.safetensors")], check=False)
    assert proc.returncode != 0 and "distill.params=offsets" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize(
    "config, args, message",
    [
        (T5, ["objective=distill"], "distill.params=offsets needs a decoder-only model"),
        (TINY, ["objective=finetune"], "distill.params=offsets is for objective=distill"),
    ],
)
def test_refused_in_one_line_before_anything_is_written(tmp_path, config, args, message):
    proc = gist_dist(["train", config, *args, "distill.params=offsets", f"output_dir={tmp_path / 'r'}"], check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
