"""Analytic FLOPs vs torch's FlopCounterMode on real forward passes; gist-cache correctness; CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import gist_dist
from gist_dist.analysis import flops, latency
from gist_dist.analysis.strategies import forward_after, strategy_cache
from gist_dist.masks import make_attention_mask

LENGTHS = [(5, 3), (26, 11), (40, 1)]  # (instruction tokens, tail tokens)


@pytest.mark.parametrize(
    "model, meta", [("tiny", False), pytest.param("smollm2", False, marks=pytest.mark.slow), ("llama-7b", True)]
)
def test_analytic_flops_match_counter_within_2_percent(model, meta):
    check = flops.check_against_counter(model, LENGTHS, num_gist=2, meta=meta)
    for strategy in flops.STRATEGIES:
        assert check[strategy]["measured"] > 0
        assert abs(check[strategy]["rel_error"]) < 0.02, (strategy, check[strategy])
    # the cut comes from not re-encoding the instruction: gist <= instruction < none
    assert check["gist"]["measured"] <= check["instruction"]["measured"] < check["none"]["measured"]


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_parameter_count_matches_the_real_model(model):
    net = flops.load_eager(model)
    assert flops.shape_of(model, net.config).params() == sum(p.numel() for p in net.parameters())


def test_gist_prefix_gives_the_masked_full_sequence_logits():
    """Caching only the gist KV (original positions kept) equals the gist-masked full forward."""
    net = flops.load_eager("tiny")
    vocab = net.config.vocab_size
    gist = [vocab - 2, vocab - 1]
    prompt, tail = list(range(30, 47)), list(range(60, 66))
    ids = torch.tensor([prompt + gist + tail])
    with torch.no_grad():
        full = net(input_ids=ids, attention_mask=make_attention_mask(ids, torch.ones_like(ids), gist, "gist")).logits
    prefix = strategy_cache(net, prompt, gist, "gist")
    assert prefix.length == len(gist) and int(prefix.next_position[0]) == len(prompt) + len(gist)
    cached = forward_after(net, tail, prefix, logits_to_keep=0).logits
    torch.testing.assert_close(cached[0], full[0, -len(tail) :], rtol=1e-4, atol=1e-5)


def test_kv_bytes_and_latency_per_strategy_on_a_real_model():
    net = flops.load_eager("tiny")
    shape = flops.shape_of("tiny", net.config)
    vocab = net.config.vocab_size
    result = latency.measure_strategies(
        net, [(list(range(10, 34)), list(range(40, 45)))], [vocab - 1], repeats=3, warmup=1, decode_tokens=3
    )
    per_token = shape.kv_bytes_per_token("fp32")
    assert result["gist"]["kv_bytes_per_prompt"] == 1 * per_token
    assert result["instruction"]["kv_bytes_per_prompt"] == 24 * per_token
    assert result["none"]["kv_bytes_per_prompt"] == 0
    for strategy in flops.STRATEGIES:
        r = result[strategy]
        assert 0 < r["ttft_p25_ms"] <= r["ttft_ms"] <= r["ttft_p75_ms"]
        assert r["decode_ms_per_token"] > 0


def test_visible_prefix_is_read_by_every_query_and_stored_once():
    """mask_prefix=visible: the gist strategy's first token reads k + n cached entries (the formula
    FlopCounterMode checks above, with that past), the n are stored once per model, and compression
    counts only what the gist replaces; the report takes n from the run's config."""
    from gist_dist.analysis.report import visible_prefix
    from gist_dist.config import ModelConfig
    from gist_dist.model import load_tokenizer

    shape, k, n = flops.shape_of("smollm2"), 2, 2
    hidden, visible = (flops.dataset_flops(shape, [(30, 7)], k, "bf16", prefix=p) for p in (0, n))
    per_token = shape.kv_bytes_per_token("bf16")
    assert visible["gflops_per_example"]["gist"] * 1e9 == flops.forward_flops(shape, 7, k + n)
    assert visible["gflops_per_example"]["gist"] > hidden["gflops_per_example"]["gist"]
    for s in ("none", "instruction"):
        assert visible["gflops_per_example"][s] == hidden["gflops_per_example"][s]
    assert visible["kv_bytes_per_prompt"] == hidden["kv_bytes_per_prompt"]
    assert visible["kv_bytes_shared"] == n * per_token and hidden["kv_bytes_shared"] == 0
    assert visible["compression"] == (30 - n) / k and "fixed head" in flops.format_table(visible)
    tok = load_tokenizer(ModelConfig(name="smollm2"))
    assert visible_prefix({"mask": "gist", "mask_prefix": "visible"}, tok) == 2  # "Instruction:"
    assert visible_prefix({"mask": "pos_control", "mask_prefix": "visible"}, tok) == 0
    assert visible_prefix({"mask": "gist"}, tok) == 0


def test_cli_contract_single_prompt_length_without_weights():
    out = gist_dist(["flops", "--model", "llama-7b", "--num-gist", "1", "--prompt-tokens", "26", "--json"], timeout=600)
    result = json.loads(out.stdout)
    shape = flops.shape_of("llama-7b")
    assert result["params"] == shape.params()
    none, gist = result["gflops_per_example"]["none"], result["gflops_per_example"]["gist"]
    assert none * 1e9 == pytest.approx(flops.forward_flops(shape, 26 + 3, 0))
    assert result["reduction_vs_none"]["gist"] == pytest.approx(1 - gist / none)
    assert result["kv_bytes_per_prompt"]["instruction"] == 26 * result["kv_bytes_per_prompt"]["gist"]


def test_cli_over_a_data_file(tmp_path):
    data = tmp_path / "d.jsonl"
    recs = [
        {"instruction": "Say hello to the reader politely", "input": "", "output": "Hello"},
        {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in recs))
    out_json = tmp_path / "flops.json"
    out = gist_dist(["flops", "--model", "tiny", "--data", str(data), "--out", str(out_json)], timeout=600)
    assert "tokenizer smollm2" in out.stdout
    result = json.loads(out_json.read_text())
    assert result["examples"] == 2
    tok, _ = flops.tokenizer_for("tiny")
    assert result["mean_prompt_tokens"] == pytest.approx(
        sum(len(tok(f"Instruction: {r['instruction']}\n", add_special_tokens=False)["input_ids"]) for r in recs) / 2
    )


@pytest.mark.parametrize(
    "args, code",
    [
        (["--model", "llama-7b"], 2),  # neither --data nor --prompt-tokens
        (["--model", "no-such-model", "--prompt-tokens", "5"], 1),
        (["--model", "llama-7b", "--data", "/nonexistent.json"], 1),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(args, code):
    proc = gist_dist(["flops", *args], check=False, timeout=600)
    assert proc.returncode == code
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_visible_prefix_is_measured_as_the_formula_counts(tmp_path):
    """--mask-prefix visible: the measured first-token FLOPs and the timed cache follow the formula
    (the gist strategy reads k + n entries), and the n prefix entries are stored once, not per prompt;
    the JSON the report reads carries the latency table."""
    out = tmp_path / "flops.json"
    proc = gist_dist(
        [
            "flops",
            "--model",
            "tiny",
            "--num-gist",
            "2",
            "--prompt-tokens",
            "12",
            "--tail-tokens",
            "4",
            "--mask-prefix",
            "visible",
            "--measure",
            "--latency",
            "--repeats",
            "2",
            "--dtype",
            "fp32",
            "--out",
            str(out),
        ],
        timeout=600,
    )
    n = flops.visible_prefix_tokens("tiny")
    assert (
        "TTFT ms" in proc.stdout and n == 2 and f"{n}-token visible prefix" in proc.stdout
    )  # "Instruction:" in SmolLM2's tokenizer
    result = json.loads(out.read_text())
    per_token = flops.shape_of("tiny").kv_bytes_per_token("fp32")
    assert result["prefix_tokens"] == n and result["compression"] == (12 - n) / 2
    for s in flops.STRATEGIES:
        assert abs(result["measured_check"][s]["rel_error"]) < 0.02, (s, result["measured_check"][s])
    gist = result["latency"]["gist"]
    assert gist["examples"][0]["cached_tokens"] == 2 + n
    assert gist["kv_bytes_per_prompt"] == 2 * per_token == result["kv_bytes_per_prompt"]["gist"]
    assert gist["kv_bytes_shared"] == n * per_token == result["kv_bytes_shared"]
    assert result["latency"]["instruction"]["kv_bytes_per_prompt"] == 12 * per_token
    hidden = flops.check_against_counter("tiny", [(12, 4)], num_gist=2)
    assert result["measured_check"]["gist"]["measured"] > hidden["gist"]["measured"]
    assert result["measured_check"]["none"]["measured"] == hidden["none"]["measured"]
    bad = gist_dist(
        ["flops", "--model", "t5-tiny", "--prompt-tokens", "12", "--mask-prefix", "visible"], check=False, timeout=600
    )
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "decoder-only" in bad.stderr
