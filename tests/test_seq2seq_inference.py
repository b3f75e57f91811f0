"""Encoder-decoder (T5) gist inference: the cached encoder equals the masked full encoder, greedy answers
from the cache equal the uncached masked path, the prompt reaches the decoder only through the gist,
and `gist-dist eval` of a T5 run gives the same answers on 1 and 2 ranks."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
from transformers import T5ForConditionalGeneration

from conftest import T5_DISTILL_ARGS, T5_GIST_ARGS, TINY, copy_of, torchrun
from gist_dist.analysis.report import write_report
from gist_dist.config import ModelConfig, load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.evaluation import load_run_model, run_eval
from gist_dist.inference.seq2seq import (
    build_seq2seq_cache,
    decoder_logits,
    encode_after_cache,
    encode_full,
    generate_uncached_seq2seq,
    greedy_seq2seq,
)
from gist_dist.model import ROOT, config_from_shape, load_tokenizer
from gist_dist.tokens import add_gist_tokens

T5_SHAPE = str(ROOT / "configs" / "models" / "t5-tiny.yaml")
T5_CONFIG = str(ROOT / "configs" / "t5-tiny.yaml")  # the training engineer's run config
MAX_NEW = 8


def tiny_t5(num_gist: int):
    """A random tiny T5 with gist tokens added to SmolLM2's tokenizer (pad = eos; decoder starts with pad)."""
    tok = load_tokenizer(ModelConfig(name="smollm2"))
    gist_ids = add_gist_tokens(tok, num_gist)
    config = config_from_shape(T5_SHAPE)
    config.pad_token_id = config.decoder_start_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(2)  # at many seeds the random model answers eos at once for every input; not at this one
    model = T5ForConditionalGeneration(config).eval()
    model.resize_token_embeddings(len(tok), mean_resizing=False)  # random gist rows: answers vary by prompt
    return model, tok, gist_ids


@pytest.fixture(scope="module")
def t5():
    return tiny_t5(num_gist=2)


def random_rows(seed: int, lengths, gist_ids=()):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 5000, (n,), generator=g).tolist() + list(gist_ids) for n in lengths]


PROMPT_LENGTHS, TAIL_LENGTHS = (3, 9, 5), (4, 2, 7)  # mixed lengths: padding in both halves


def test_relative_position_bias_depends_only_on_distance(t5):
    """Laying a request out as [gist ; input] gives the bias the full prompt + gist + input sequence has there."""
    model, _, _ = t5
    attention = model.get_encoder().block[0].layer[0].SelfAttention
    k, n = 2, 6
    for P in (k, 7, 40, 200):  # prompt + gist lengths, past T5's exact buckets and max distance
        full = attention.compute_bias(P + n, P + n)
        request = attention.compute_bias(n, k + n, past_seen_tokens=k)
        assert torch.equal(request, full[:, :, P:, P - k :])


def test_cached_encoder_equals_masked_full_encoder(t5):
    model, _, gist_ids = t5
    k = len(gist_ids)
    prompts, tails = random_rows(1, PROMPT_LENGTHS, gist_ids), random_rows(2, TAIL_LENGTHS)
    cache = build_seq2seq_cache(model, prompts, gist_ids, "gist")
    cached, cached_cross = encode_after_cache(model, cache, tails)
    full, full_cross = encode_full(model, prompts, tails, gist_ids, "gist")
    for b, (p, t) in enumerate(zip(prompts, tails)):  # the positions the decoder sees: gist + input
        seen = slice(len(p) - k, len(p) + len(t))
        assert torch.allclose(cached[b, : k + len(t)], full[b, seen], atol=1e-5)
        assert cached_cross[b].sum() == full_cross[b].sum() == k + len(t)
    decoder = torch.randint(0, 5000, (len(prompts), 6), generator=torch.Generator().manual_seed(3))
    a, b = decoder_logits(model, cached, cached_cross, decoder), decoder_logits(model, full, full_cross, decoder)
    # the encoder states agree to fp32 rounding (~1e-6); the random untied head scales them into logits of
    # tens, so the bound is 1e-5 of the logits' own scale
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # what is kept: k states per layer + k outputs per row, against the same for every instruction token
    per_token = (model.config.num_layers + 1) * model.config.d_model * 4
    assert cache.nbytes() == [k * per_token] * len(prompts)
    assert cache.full_prompt_nbytes() == [(len(p) - k) * per_token for p in prompts]


@pytest.mark.parametrize("mask", ["gist", "neg_control", "pos_control"])
def test_cached_greedy_equals_uncached(t5, mask):
    model, tok, gist_ids = t5
    prompts, tails = random_rows(4, PROMPT_LENGTHS, gist_ids), random_rows(5, TAIL_LENGTHS)
    answers, cache = greedy_seq2seq(model, prompts, tails, gist_ids, mask, MAX_NEW, tok.eos_token_id, tok.pad_token_id)
    assert answers == generate_uncached_seq2seq(model, prompts, tails, gist_ids, mask, MAX_NEW, tok.eos_token_id)
    assert all(answers)  # not eos at once: every row's greedy loop really ran
    kept = {"gist": [len(gist_ids)] * 3, "neg_control": [0] * 3, "pos_control": [len(p) for p in prompts]}[mask]
    assert cache.nbytes() == [n * cache.bytes_per_token() for n in kept]


def test_neg_control_cache_needs_nothing_of_the_prompt(t5):
    model, tok, gist_ids = t5
    tails = random_rows(6, TAIL_LENGTHS)
    states = [
        encode_after_cache(
            model,
            build_seq2seq_cache(model, random_rows(seed, PROMPT_LENGTHS, gist_ids), gist_ids, "neg_control"),
            tails,
        )[0]
        for seed in (7, 8)
    ]
    assert states[0].shape[1] == max(TAIL_LENGTHS) and torch.equal(states[0], states[1])
    with pytest.raises(ValueError, match="pos_control"):
        build_seq2seq_cache(model, random_rows(7, PROMPT_LENGTHS, gist_ids), gist_ids, "pos_control")


def full_logits(model, prompts, tails, gist_ids, decoder, hold=None):
    """Decoder logits of the masked full path. `hold`: per encoder layer, block outputs whose gist
    columns replace this run's (the gist positions' states held fixed); returns (logits, block outputs)."""
    gist = torch.tensor(gist_ids)
    outputs, handles = [], []
    for layer, block in enumerate(model.get_encoder().block):

        def hook(module, args, out, layer=layer):
            h = out[0]
            if hold is not None:
                at = torch.isin(ids, gist)[..., None]
                h = torch.where(at, hold[layer], h)
            outputs.append(h)
            return (h, *out[1:])

        handles.append(block.register_forward_hook(hook))
    ids = torch.tensor([p + t for p, t in zip(prompts, tails)])  # equal lengths: gist columns line up
    try:
        states, cross = encode_full(model, prompts, tails, gist_ids, "gist")
    finally:
        for h in handles:
            h.remove()
    return decoder_logits(model, states, cross, decoder), outputs


def test_prompt_reaches_decoder_only_through_gist(t5):
    model, _, gist_ids = t5
    prompt_a = random_rows(9, (6, 6, 6), gist_ids)
    prompt_b = [[(x + 17) % 5000 if x not in gist_ids else x for x in p] for p in prompt_a]  # other pre-gist tokens
    tails = random_rows(10, (5, 5, 5))
    decoder = torch.randint(0, 5000, (3, 6), generator=torch.Generator().manual_seed(11))
    a, held = full_logits(model, prompt_a, tails, gist_ids, decoder)
    b_held, _ = full_logits(model, prompt_b, tails, gist_ids, decoder, hold=held)
    b_free, _ = full_logits(model, prompt_b, tails, gist_ids, decoder)
    assert torch.allclose(b_held, a, atol=1e-5)  # prompt B with A's gist states: A's logits
    assert (b_free - a).abs().max() > 1e-2  # the prompt does matter, through the gist
    # the cached path is that very computation: A's cache answers any input as A's full run does
    cached = decoder_logits(
        model, *encode_after_cache(model, build_seq2seq_cache(model, prompt_a, gist_ids), tails), decoder
    )
    assert (cached - a).abs().max() <= 1e-5 * a.abs().max()


def read_eval(run):
    result = json.loads((run / "eval.json").read_text())
    return result, [json.loads(line) for line in (run / "eval_outputs.jsonl").read_text().splitlines()]


def uncached_predictions(cfg, records) -> list[str]:
    """The run's answers to these records (instruction, input) by the reference path: full masked encoder, no cache."""
    em = load_run_model(cfg)
    template = GistTemplate(em.tok, em.gist_ids, 1 << 30, template=em.template or cfg.data.template)
    pieces = [template.pieces({**r, "output": ""}) for r in records]
    answers = generate_uncached_seq2seq(
        em.model,
        [p + em.gist_ids for p, _, _ in pieces],
        [t for _, t, _ in pieces],
        em.gist_ids,
        em.mask,
        MAX_NEW,
        em.tok.eos_token_id,
        embed=em.embed,
    )
    return [em.tok.decode(a, skip_special_tokens=True).strip() for a in answers]


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """A final/-style T5 run folder (save_pretrained + gist_model.json, what finetune exports) and eval
    files whose references are its own uncached greedy answers."""
    run = tmp_path_factory.mktemp("t5") / "run"
    model, tok, gist_ids = tiny_t5(num_gist=1)
    model.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    (run / "final" / "gist_model.json").write_text(
        json.dumps({"mask": "gist", "num_gist": 1, "gist_tokens": tok.convert_ids_to_tokens(gist_ids)})
    )
    cfg = load_config(TINY, [f"output_dir={run}"])
    assert load_run_model(cfg).family == "seq2seq"
    splits = {}
    for split in ("seen", "unseen"):
        records = load_records(f"generated:{split}", n=10, seed=7)
        references = uncached_predictions(cfg, records)
        assert all(references) and len(set(references)) > 1
        path = run / f"{split}.jsonl"
        path.write_text("".join(json.dumps({**r, "output": ref}) + "\n" for r, ref in zip(records, references)))
        splits[split] = path
    return run, splits


@pytest.mark.slow
def test_eval_of_a_t5_run_gives_its_uncached_answers(t5_run):
    """gist-dist eval of a T5 folder: the cached answers are the uncached reference, exactly."""
    run, splits = t5_run
    result = run_eval(
        load_config(
            TINY,
            [
                f"output_dir={run}",
                f"eval_max_new_tokens={MAX_NEW}",
                "eval_batch_size=4",
                "data.eval_splits=" + ",".join(f"{k}:{v}" for k, v in splits.items()),
            ],
        )
    )
    _, outputs = read_eval(run)
    assert result["mask"] == "gist" and [o["prediction"] for o in outputs] == [o["reference"] for o in outputs]
    for s in result["splits"].values():
        assert s["n"] == 10 and s["exact_match"] == 1.0 and s["rougeL"] == pytest.approx(1.0)
        assert s["kv_bytes_per_prompt"]["cached"] < s["kv_bytes_per_prompt"]["full_prompt"]


def test_eval_of_trained_t5_runs(t5_gist_run, t5_distill_run, tmp_path):
    """Real 2-rank ZeRO-3 runs of configs/t5-tiny.yaml: the gist fine-tune evaluated on 1 rank and on 2
    ZeRO-3 ranks gives the same results, and the distill artifact (base + gist.safetensors) evaluates
    too; both answer from the cache exactly as the uncached masked path does."""
    args = ["data.num_eval=10", f"eval_max_new_tokens={MAX_NEW}", "eval_batch_size=4"]  # 3 batches: uneven over 2 ranks
    gist, distill = copy_of(t5_gist_run, tmp_path / "gist"), copy_of(t5_distill_run, tmp_path / "distill")
    cfg = load_config(T5_CONFIG, [f"output_dir={gist}", *T5_GIST_ARGS, *args])
    one = run_eval(cfg)
    _, one_outputs = read_eval(gist)
    torchrun(["eval", T5_CONFIG, f"output_dir={gist}", *T5_GIST_ARGS, *args, "--zero3"])
    two, two_outputs = read_eval(gist)
    assert (one["world_size"], two["world_size"], two["zero3"]) == (1, 2, True) and two["model"].endswith("final")

    def same(splits):
        return {n: {k: v for k, v in s.items() if k != "generate_s"} for n, s in splits.items()}

    assert same(one["splits"]) == same(two["splits"]) and one_outputs == two_outputs
    assert [o["prediction"] for o in one_outputs] == uncached_predictions(cfg, one_outputs)
    assert any(o["prediction"] for o in one_outputs)  # some answers are more than eos
    write_report([str(gist)], peak_gflops=50.0)  # the report follows the T5 family (strategies, no LLaMA MFU)
    report = json.loads((gist / "report.json").read_text())["runs"][0]
    assert list(report["flops"]["gflops_per_example"]) == ["none", "gist", "no_prompt"]
    assert report["mfu"]["mfu"] is None and "encoder-decoder" in (gist / "report.md").read_text()
    assert matplotlib.image.imread(gist / "strategies.png").shape[0] > 100

    cfg = load_config(T5_CONFIG, [f"output_dir={distill}", *T5_DISTILL_ARGS, *args])
    result = run_eval(cfg)
    _, outputs = read_eval(distill)
    assert result["model"].endswith("gist.safetensors") and result["splits"]["seen"]["n"] == 10
    assert [o["prediction"] for o in outputs] == uncached_predictions(cfg, outputs) and any(
        o["prediction"] for o in outputs
    )
