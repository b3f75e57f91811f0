"""Encoder-decoder (T5) training under 2-rank ZeRO-3 (configs/t5-tiny.yaml: every parameter
partitioned): fine-tuning with the three masks, with export and bit-exact resume, and distillation of
the gist rows with a frozen backbone, with bit-exact resume. Recorded eval losses are recomputed on
one process from what was exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import fresh_dir_resuming_from
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from conftest import T5, TINY, torchrun
from conftest import T5_DISTILL_ARGS as DISTILL_ARGS
from conftest import T5_GIST_ARGS as GIST_ARGS
from conftest import T5_SAVE_EVERY as SAVE_EVERY
from conftest import T5_STEPS as STEPS
from gist_dist import artifact
from gist_dist.config import ConfigError, ModelConfig, load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.data.batches import ShardedBatches
from gist_dist.methods import Tokens, method_for
from gist_dist.methods.seq2seq import Seq2SeqLMLoss, split
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import add_gist_tokens

SHAPE = ModelConfig(name="configs/models/t5-tiny.yaml", tokenizer="smollm2")


def log(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[0], [r for r in rows if "step" in r], rows[-1]


def eval_loss_on_one_process(cfg, method, module) -> float:
    """The Trainer's eval loss (2 ranks' eval batches, summed, per target token), on this process."""
    tok = method.tokens.tokenizer
    template = GistTemplate(tok, method.tokens.gist_ids, cfg.data.max_length, cfg.data.overlong, cfg.data.template)
    records = load_records(cfg.data.eval, n=cfg.data.num_eval, seed=cfg.data.seed + 1, role="eval", split="seen")
    examples = method.encode(template, records, None, "eval")
    size = max(1, min(cfg.train.micro_batch_size, len(examples) // 2))
    total = targets = 0.0
    with torch.no_grad():
        for rank in (0, 1):
            batches = ShardedBatches(examples, size, rank, 2, 0, shuffle=False)
            for _ in range(min(cfg.train.eval_batches, batches.per_epoch)):
                chunk = next(batches)
                total += float(module(**method.collate(chunk, torch.device("cpu"))[0]))
                targets += method.targets(chunk)
    return total / targets


@pytest.fixture
def gist_run(t5_gist_run) -> Path:
    return t5_gist_run


@pytest.fixture
def distill_run(t5_distill_run) -> Path:
    return t5_distill_run


def test_t5_loads_as_seq2seq_and_takes_token_ids_by_the_rule(tmp_path):
    tok = load_tokenizer(SHAPE)
    model = load_model(SHAPE)
    assert model.config.is_encoder_decoder and model.can_generate()
    # a shape file's T5: pad and eos from its tokenizer, the decoder starts with pad
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert model.config.decoder_start_token_id == tok.pad_token_id
    # a checkpoint folder (as a real FLAN-T5 is) keeps the ids its config has, with its own tokenizer
    model.config.pad_token_id, model.config.eos_token_id, model.config.decoder_start_token_id = 0, 1, 0
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_model(ModelConfig(name=str(tmp_path)))
    assert (again.config.pad_token_id, again.config.eos_token_id, again.config.decoder_start_token_id) == (0, 1, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    for name in (str(tmp_path), SHAPE.name):
        cfg = load_config(T5, [f"model.name={name}"])
        assert method_for(cfg).__name__ == "Seq2SeqFinetune"
    assert method_for(load_config(T5, ["objective=distill"])).__name__ == "Seq2SeqDistill"
    assert method_for(load_config(TINY)).__name__ == "Finetune"


def test_a_checkpoint_with_its_own_head_keeps_it_under_zero3(tmp_path):
    """FLAN-T5 stores an LM head apart from the embedding. Loaded inside zero.Init on 2 ranks, trained
    2 steps and exported, the head is still its own: near the stored head, far from the embedding."""
    tok = load_tokenizer(SHAPE)
    model = load_model(SHAPE)
    torch.manual_seed(4)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.config.tie_word_embeddings = False
    folder = tmp_path / "untied"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    head, embedding = model.lm_head.weight.detach(), model.get_input_embeddings().weight.detach()
    out = tmp_path / "run"
    torchrun(["train", T5, f"model.name={folder}", f"output_dir={out}", "train.max_steps=2"])
    final = AutoModelForSeq2SeqLM.from_pretrained(out / "final", dtype=torch.float32)
    rows = head.shape[0]  # the rows the checkpoint had; the gist row was added after them
    trained_head, trained_embedding = final.lm_head.weight[:rows], final.get_input_embeddings().weight[:rows]
    assert (trained_head - head).abs().max() < 0.05 < (trained_head - trained_embedding).abs().max()
    assert not torch.equal(trained_embedding, embedding)  # both trained, each from its own values


@pytest.mark.parametrize("override", ["data.packing=true", "model.attention=flex", "mask_prefix=visible"])
def test_packing_flex_and_visible_prefix_are_refused_for_t5_in_one_line(override):
    with pytest.raises(ConfigError) as e:
        method_for(load_config(T5, [override]))
    assert override.split("=")[0] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mask", ["gist", "pos_control", "neg_control"])
def test_logit_light_loss_equals_hf_loss(mask):
    """The summed loss (LM head on answer rows only) equals HF's full-logit loss x its token count,
    HF shifting the answer right with the config's decoder start: the same decoder inputs."""
    cfg = load_config(T5, [f"mask={mask}"])
    tok = load_tokenizer(cfg.model)
    tokens = Tokens(tok, add_gist_tokens(tok, 1), len(tok) - 1, tok.pad_token_id)
    method = method_for(cfg)(cfg, tokens, torch.float32)
    module, _ = method.wrap(load_model(cfg.model, vocab_min=tokens.num_old))
    records = load_records("generated", n=4, seed=3)
    examples = method.encode(GistTemplate(tok, tokens.gist_ids, 64), records, None, "eval")
    batch, _ = method.collate(list(examples), torch.device("cpu"))
    ours = module(**batch)
    model = module.model
    answers = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(split(e, 0)[1]["labels"][1:]) for e in examples], batch_first=True, padding_value=-100
    )
    encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    theirs = model(encoder_outputs=encoded, attention_mask=batch["encoder_attention_mask"], labels=answers).loss
    count = (answers != -100).sum()
    assert count == method.targets(list(examples))
    assert torch.allclose(ours, theirs * count, rtol=1e-5)


def test_gist_training_loss_falls(gist_run):
    start, steps, end = log(gist_run)
    assert start["world_size"] == 2 and start["mask"] == "gist" and end["event"] == "end"
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert steps[-1]["eval_loss"] < start["eval_loss_before"]
    # ZeRO-3 really shards: each rank's optimizer shard holds about half of the states
    sizes = [p.stat().st_size for p in (gist_run / "checkpoints" / f"step{STEPS:08d}").glob("*optim_states.pt")]
    assert len(sizes) == 2 and max(sizes) < 0.6 * sum(sizes)


def test_export_reloads_with_the_trained_weights(gist_run):
    """final/ loads with AutoModelForSeq2SeqLM on one process; its weights are those consolidated from
    the ZeRO-3 shards (zero_to_fp32), and it reproduces the eval loss the 2 ranks recorded."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    final = gist_run / "final"
    model = AutoModelForSeq2SeqLM.from_pretrained(final, dtype=torch.float32).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(gist_run / "checkpoints"))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    exported = model.state_dict()
    assert set(state) <= set(exported)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name

    tok = AutoTokenizer.from_pretrained(final)
    gist_tokens = json.loads((final / "gist_model.json").read_text())["gist_tokens"]
    gist_ids = tok.convert_tokens_to_ids(gist_tokens)
    emb = model.get_input_embeddings().weight
    assert not torch.allclose(emb[gist_ids[0]], emb[: gist_ids[0]].mean(0), atol=1e-4)  # the gist row trained

    cfg = load_config(T5, GIST_ARGS)
    method = method_for(cfg)(cfg, Tokens(tok, gist_ids, len(tok) - 1, tok.pad_token_id), torch.float32)
    method.start_id = model.config.decoder_start_token_id  # what wrap() records (wrap would re-init the gist row)
    recorded = log(gist_run)[1][-1]["eval_loss"]
    assert eval_loss_on_one_process(cfg, method, Seq2SeqLMLoss(model)) == pytest.approx(recorded, rel=1e-5)


@pytest.mark.parametrize("objective", ["finetune", "distill"])
def test_resume_is_bit_exact(objective, gist_run, distill_run, tmp_path):
    run, args = (gist_run, GIST_ARGS) if objective == "finetune" else (distill_run, DISTILL_ARGS)
    out = fresh_dir_resuming_from(run, f"step{SAVE_EVERY:08d}", tmp_path / "resumed")
    proc = torchrun(["train", T5, f"output_dir={out}", *args])
    assert f"at step {SAVE_EVERY}" in proc.stdout
    reference, resumed = log(run)[1], log(out)[1]
    assert [r["step"] for r in resumed] == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference[SAVE_EVERY:]]  # exact
    assert resumed[-1]["eval_loss"] == reference[-1]["eval_loss"]
    if objective == "distill":
        assert torch.equal(load_file(out / artifact.WEIGHTS)["gist"], load_file(run / artifact.WEIGHTS)["gist"])


@pytest.mark.parametrize("mask", ["pos_control", "neg_control"])
def test_control_fine_tunes_train_and_export(mask, tmp_path):
    """The two bounds train like gist under 2-rank ZeRO-3, and export says which mask they were trained with."""
    torchrun(["train", T5, f"output_dir={tmp_path}", f"mask={mask}", "train.max_steps=4"])
    start, steps, end = log(tmp_path)
    assert (start["world_size"], start["objective"], start["mask"], end["event"]) == (2, "finetune", mask, "end")
    assert steps[-1]["eval_loss"] < start["eval_loss_before"]
    assert json.loads((tmp_path / "final" / "gist_model.json").read_text())["mask"] == mask
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "final").config.is_encoder_decoder


def test_distill_trains_only_the_gist_and_keeps_the_backbone(distill_run):
    start, steps, end = log(distill_run)
    assert start["trainable_params"] == 2 * 64  # k x d_model, nothing else
    assert steps[-1]["eval_loss"] < start["eval_loss_before"]  # KL(teacher || student) on held-out data
    assert end["frozen_digest_before"] == end["frozen_digest_after"]  # every gathered weight, bit for bit


def test_distill_artifact_round_trip(distill_run):
    """The artifact holds the trained rows (== the consolidated checkpoint), loads only onto its base,
    and with that base gives back the eval loss the 2 ranks recorded."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = load_config(T5, DISTILL_ARGS)
    tok = load_tokenizer(cfg.model)
    tokens = Tokens(tok, add_gist_tokens(tok, 2), len(tok) - 2, tok.pad_token_id)
    base = load_model(cfg.model, vocab_min=tokens.num_old).eval()
    gist, meta = artifact.load(
        distill_run, expected_fingerprint=artifact.BaseModel(base.config, base.get_input_embeddings().weight)
    )
    assert gist.shape == (2, 64) and meta["gist_tokens"] == ["<GIST_0>", "<GIST_1>"]
    saved = get_fp32_state_dict_from_zero_checkpoint(str(distill_run / "checkpoints"))
    assert list(saved) == ["gist_rows.gist"] and torch.equal(gist, saved["gist_rows.gist"])

    other = load_model(ModelConfig(name=SHAPE.name, tokenizer="smollm2", seed=1))
    with pytest.raises(artifact.ArtifactError, match="trained for base model"):
        artifact.load(
            distill_run, expected_fingerprint=artifact.BaseModel(other.config, other.get_input_embeddings().weight)
        )

    method = method_for(cfg)(cfg, tokens, torch.float32)
    module, _ = method.wrap(base)
    assert not torch.allclose(module.gist_rows.gist, gist, atol=1e-3)  # trained away from the mean init
    with torch.no_grad():
        module.gist_rows.gist.copy_(gist)
    recorded = log(distill_run)[1][-1]["eval_loss"]
    assert eval_loss_on_one_process(cfg, method, module) == pytest.approx(recorded, rel=1e-5)
