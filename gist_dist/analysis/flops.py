"""Analytic inference FLOPs of a LLaMA-family model for three prompt-caching strategies.

Notation (read from any HF config or a shape file in configs/models/):
    L layers, h hidden, a query heads, g key/value heads, d head dim (h/a unless the config says),
    I MLP intermediate size, V vocabulary.

Counting convention: matrix multiplications only, 2 FLOPs per multiply-add (as Kaplan et al. 2020,
PaLM's MFU appendix and torch.utils.flop_counter). Norms, RoPE, SiLU, softmax and the embedding
lookup are element-wise or gathers and are left out (under 1% here).

Per token and layer, the projections cost
    q, o:        2 * h*(a*d)  each                         -> 4*h*a*d
    k, v:        2 * h*(g*d)  each                         -> 4*h*g*d
    gate, up, down (SwiGLU MLP): 2 * h*I each              -> 6*h*I
so   LINEAR = L * (4*h*a*d + 4*h*g*d + 6*h*I)   per token.
Attention of q new query tokens against c keys (c = cached + new), per layer:
    scores Q K^T: 2*a*d*q*c,  weighted values P V: 2*a*d*q*c  -> 4*a*d*q*c
The mask is applied to a dense score matrix (eager and masked sdpa compute every entry), so the
count is dense, not halved for causality; that is also what FlopCounterMode counts.
The LM head costs 2*h*V per token whose logits are computed; generation's prefill asks for the
last position only (`logits_to_keep=1`), so 1 token per forward here.

    forward(n new tokens, p cached) = n*LINEAR + L*4*a*d*n*(p+n) + logits*2*h*V

Strategies for one example with instruction P tokens, k gist tokens and tail X tokens
("\\nInput: ...\\nOutput:"), counting the forward that yields the first output token:
    none         forward(P+X, 0)   encode instruction and input every time
    instruction  forward(X,   P)   the instruction's KV is cached (P tokens kept per prompt)
    gist         forward(X,   k)   only the gist tokens' KV is cached (k tokens kept per prompt)
The one-off cost of building a cache (forward(P, 0) or forward(P+k, 0)) is reported apart: it is
paid once per prompt, not per query.

Encoder-decoder (T5 v1.1 / FLAN-T5, `Seq2SeqShape`): E encoder and D decoder layers, h = d_model,
a heads of d = d_kv (n = a*d), F = d_ff, m = 3 FFN matrices when gated (gated-gelu) else 2. Same
convention (matmuls only; T5's relative position bias is an embedding lookup, not counted):
    encoder layer, per token   q, k, v, o 8*h*n + FFN 2*m*h*F
    encoder self-attention     4*n*q*c   (q new tokens against c = cached + new keys, bidirectional)
    cached keys, values        4*h*n*C per encoder layer: projected per request from the C kept states
    decoder layer, per token   self q, k, v, o 8*h*n + cross q, o 4*h*n + FFN 2*m*h*F
    decoder attention          self 4*n*q*(past+q) + cross 4*n*q*S over the S encoder positions it sees
    cross k, v                 4*h*n*S per decoder layer, computed at the first decoder step, then cached
    LM head                    2*h*V per decoder token
    seq2seq(N new, C cached, S seen) = encoder(N, C) + decoder(first token, S)
T5 strategies for instruction P, k gist tokens and input X, counting the request up to the first
output token (encoder + one decoder step from the start token):
    none       (P+k+X, 0, P+k+X)  the masked full prompt encoded every time, cross-attention over all
    gist       (X,     k, k+X)    prompt + gist encoded once (build_gist_cache = encoder(P+k, 0)); per
                                  request only X is encoded (inference.seq2seq.encode_after_cache):
                                  each layer's self-attention reads the k gist positions as extra
                                  keys, their keys/values projected from the layer's kept gist states;
                                  the decoder cross-attends the k kept gist outputs + X (cross k, v of
                                  all k+X projected per request, as HF's T5 does)
    no_prompt  (X,     0, X)      the input alone (the floor: no instruction at all)
There is no exact T5 "instruction" cache: the bidirectional encoder's prompt states depend on the input.
Kept per prompt with the gist cache: k * (E + 1) * h values (the gist states entering every encoder
layer, and the final ones); caching keys/values instead would save the 4*h*n*k per layer for 2*n/h
times the bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from ..atomic import write_text
from ..config import ConfigError
from ..model import ROOT, config_from_shape, is_shape_file, resolve_model_path
from .strategies import STRATEGIES

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SEQ2SEQ_STRATEGIES = ("none", "gist", "no_prompt")


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    strategies: ClassVar[tuple] = STRATEGIES

    def describe(self) -> str:
        return (
            f"L={self.layers} h={self.hidden} heads={self.heads}/{self.kv_heads} I={self.intermediate} "
            f"V={self.vocab} tied={self.tied}"
        )

    def strategy_inputs(self, prompt: int, tail: int, num_gist: int, prefix: int = 0) -> dict:
        return strategy_inputs(prompt, tail, num_gist, prefix)

    def first_token_flops(self, new: int, past: int) -> int:
        return forward_flops(self, new, past)

    def next_token_flops(self, new: int, past: int) -> int:
        return forward_flops(self, 1, past + new)  # the first output token, after the cache grew by `new`

    def cache_build_flops(self, prompt: int, num_gist: int) -> dict:
        return {
            "instruction": forward_flops(self, prompt, 0, logits=0),
            "gist": forward_flops(self, prompt + num_gist, 0, logits=0),
        }

    @property
    def linear_per_token(self) -> int:
        h, a, g, d = self.hidden, self.heads, self.kv_heads, self.head_dim
        return self.layers * (4 * h * a * d + 4 * h * g * d + 6 * h * self.intermediate)

    def layer_params(self) -> int:
        h, a, g, d = self.hidden, self.heads, self.kv_heads, self.head_dim
        return 2 * h * a * d + 2 * h * g * d + 3 * h * self.intermediate + 2 * h  # projections + 2 RMSNorms

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embeddings + self.hidden  # + final norm

    def largest_module_params(self) -> int:
        """Largest single module (what DeepSpeed gathers at once): embedding or an MLP projection."""
        h, a, d = self.hidden, self.heads, self.head_dim
        return max(self.vocab * h, h * self.intermediate, h * a * d)

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]  # keys + values


@dataclass(frozen=True)
class Seq2SeqShape:
    """A T5-family encoder-decoder (notation in the module docstring)."""

    name: str
    encoder_layers: int
    decoder_layers: int
    hidden: int
    heads: int
    head_dim: int
    ff: int
    gated: bool
    vocab: int
    tied: bool
    buckets: int = 32
    strategies: ClassVar[tuple] = SEQ2SEQ_STRATEGIES

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.gated else 2

    def describe(self) -> str:
        return (
            f"encoder-decoder E={self.encoder_layers} D={self.decoder_layers} h={self.hidden} "
            f"heads={self.heads}x{self.head_dim} F={self.ff} gated={self.gated} V={self.vocab} tied={self.tied}"
        )

    def strategy_inputs(self, prompt: int, tail: int, num_gist: int, prefix: int = 0) -> dict:
        """(encoder new tokens, encoder cached tokens, encoder positions the decoder sees) per strategy."""
        assert prefix == 0, "mask_prefix=visible is refused for encoder-decoder models"
        full = prompt + num_gist + tail
        return {"none": (full, 0, full), "gist": (tail, num_gist, num_gist + tail), "no_prompt": (tail, 0, tail)}

    def first_token_flops(self, new: int, cached: int, seen: int) -> int:
        return encoder_flops(self, new, cached) + decoder_flops(self, seen)

    def next_token_flops(self, new: int, cached: int, seen: int) -> int:
        return decoder_flops(self, seen, new=1, past=1)

    def cache_build_flops(self, prompt: int, num_gist: int) -> dict:
        return {"gist": encoder_flops(self, prompt + num_gist, 0)}

    def params(self) -> int:
        h, n, f = self.hidden, self.inner, self.ffn_matrices * self.hidden * self.ff
        encoder = self.encoder_layers * (4 * h * n + f + 2 * h)  # self-attention, FFN, 2 norms
        decoder = self.decoder_layers * (8 * h * n + f + 3 * h)  # + cross-attention and its norm
        bias = 2 * self.buckets * self.heads  # relative position bias of each stack's first layer
        return self.vocab * h * (1 if self.tied else 2) + encoder + decoder + bias + 2 * h  # + final norms

    def largest_module_params(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.ff, self.hidden * self.inner)

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Kept per cached gist position: its state entering every encoder layer, and the final one."""
        return (self.encoder_layers + 1) * self.hidden * DTYPE_BYTES[dtype]


def encoder_flops(shape: Seq2SeqShape, new: int, cached: int = 0) -> int:
    """T5 encoder over `new` tokens whose self-attention also reads `cached` kept positions (their
    keys/values projected from the kept states)."""
    linear = 8 * shape.hidden * shape.inner + 2 * shape.ffn_matrices * shape.hidden * shape.ff
    cached_kv = 4 * shape.hidden * shape.inner * cached
    return shape.encoder_layers * (new * linear + cached_kv + 4 * shape.inner * new * (cached + new))


def decoder_flops(shape: Seq2SeqShape, seen: int, new: int = 1, past: int = 0, logits: int = 1) -> int:
    """T5 decoder over `new` tokens after `past` ones, cross-attending `seen` encoder positions; the
    cross keys/values are projected at the first step only (past == 0) and cached after."""
    h, n = shape.hidden, shape.inner
    linear = 12 * h * n + 2 * shape.ffn_matrices * h * shape.ff
    cross_kv = 4 * h * n * seen if past == 0 else 0
    attention = 4 * n * new * (past + new) + 4 * n * new * seen
    return shape.decoder_layers * (new * linear + cross_kv + attention) + logits * 2 * h * shape.vocab


def model_shape_path(name: str) -> str:
    """ "llama-7b" -> configs/models/llama-7b.yaml; anything else as model.resolve_model_path."""
    named = ROOT / "configs" / "models" / f"{name}.yaml"
    if named.is_file():
        return str(named)
    if name.endswith("config.json") and Path(name).is_file():
        return str(Path(name).parent)
    return resolve_model_path(name)


def hf_config(name: str):
    path = model_shape_path(name)
    if is_shape_file(path):
        return config_from_shape(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"model {name!r}: no shape file, HF folder or config.json ({str(e).splitlines()[0]})"
        ) from None


def shape_of(name: str, config=None) -> Shape | Seq2SeqShape:
    if config is None and is_shape(name):  # plain YAML: no transformers import, answers in a second
        from types import SimpleNamespace

        from ..model import load_shape

        config = SimpleNamespace(**load_shape(model_shape_path(name)))
    c = config if config is not None else hf_config(name)
    if getattr(c, "model_type", "llama") == "t5":
        return seq2seq_shape_of(name, c)
    text = getattr(c, "get_text_config", lambda: c)()
    heads = text.num_attention_heads
    return Shape(
        name=name,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
    )


def seq2seq_shape_of(name: str, c) -> Seq2SeqShape:
    """From a T5Config or a t5 shape file's fields (T5Config's defaults where a file leaves one out)."""
    get = lambda key, default: getattr(c, key, None) or default  # noqa: E731
    # transformers 5 T5Config forces tie_word_embeddings=True and keeps the checkpoint's own value
    # as scale_decoder_outputs (T5 v1.1 / FLAN-T5: False, a separate lm_head)
    tied = getattr(c, "scale_decoder_outputs", getattr(c, "tie_word_embeddings", True))
    return Seq2SeqShape(
        name=name,
        encoder_layers=c.num_layers,
        decoder_layers=get("num_decoder_layers", c.num_layers),
        hidden=c.d_model,
        heads=c.num_heads,
        head_dim=get("d_kv", 64),
        ff=c.d_ff,
        gated=get("feed_forward_proj", "relu").startswith("gated-"),
        vocab=c.vocab_size,
        tied=bool(tied),
        buckets=get("relative_attention_num_buckets", 32),
    )


def forward_flops(shape: Shape, new: int, past: int = 0, logits: int = 1) -> int:
    """Matmul FLOPs of one forward over `new` tokens with `past` cached tokens (formula above)."""
    attention = shape.layers * 4 * shape.heads * shape.head_dim * new * (past + new)
    return new * shape.linear_per_token + attention + logits * 2 * shape.hidden * shape.vocab


def strategy_inputs(prompt: int, tail: int, num_gist: int, prefix: int = 0) -> dict:
    """(new tokens, cached tokens) of the first-token forward per strategy. `prefix`: the template's
    fixed head kept visible (mask_prefix=visible), read by the gist strategy beside its k entries."""
    return {"none": (prompt + tail, 0), "instruction": (tail, prompt), "gist": (tail, num_gist + prefix)}


def example_flops(shape: Shape | Seq2SeqShape, prompt: int, tail: int, num_gist: int, prefix: int = 0) -> dict:
    """Per strategy: first-token FLOPs, `next/` one further output token, `cached/` tokens kept per
    prompt (a visible prefix is kept once per model, not per prompt); `build/` the one-off cache builds."""
    per = {}
    for s, inputs in shape.strategy_inputs(prompt, tail, num_gist, prefix).items():
        per[s], per[f"next/{s}"], per[f"cached/{s}"] = (
            shape.first_token_flops(*inputs),
            shape.next_token_flops(*inputs),
            inputs[1] - (prefix if s == "gist" else 0),
        )
    per.update({f"build/{s}": f for s, f in shape.cache_build_flops(prompt, num_gist).items()})
    return per


def dataset_flops(
    shape: Shape | Seq2SeqShape, lengths: list[tuple[int, int]], num_gist: int, dtype: str = "bf16", prefix: int = 0
) -> dict:
    """Aggregate over real (prompt tokens, tail tokens) pairs: mean FLOPs, reduction, KV bytes.
    `prefix` > 0 (mask_prefix=visible): its entries are read by every query and stored once."""
    if not lengths:
        raise ValueError("no examples to count FLOPs over")
    n = len(lengths)
    totals: dict = {}
    for prompt, tail in lengths:
        for key, value in example_flops(shape, prompt, tail, num_gist, prefix).items():
            totals[key] = totals.get(key, 0) + value
    mean = {k: v / n for k, v in totals.items()}
    mean_prompt = sum(p for p, _ in lengths) / n
    kv = shape.kv_bytes_per_token(dtype)
    return {
        "model": asdict(shape),
        "shape": shape.describe(),
        "params": shape.params(),
        "num_gist": num_gist,
        "examples": n,
        "dtype": dtype,
        "mean_prompt_tokens": mean_prompt,
        "mean_tail_tokens": sum(t for _, t in lengths) / n,
        "compression": (mean_prompt - prefix) / num_gist,
        "prefix_tokens": prefix,
        "kv_bytes_shared": prefix * kv,
        "gflops_per_example": {s: mean[s] / 1e9 for s in shape.strategies},
        "gflops_next_token": {s: mean[f"next/{s}"] / 1e9 for s in shape.strategies},
        "gflops_build_cache": {k.split("/")[1]: v / 1e9 for k, v in mean.items() if k.startswith("build/")},
        "reduction_vs_none": {s: 1 - totals[s] / totals["none"] for s in shape.strategies},
        "kv_bytes_per_prompt": {s: mean[f"cached/{s}"] * kv for s in shape.strategies},
    }


def prompt_lengths(records: list[dict], tokenizer) -> list[tuple[int, int]]:
    """(instruction tokens, tail tokens) per record, in the training template (data.GistTemplate)."""
    from ..data import GistTemplate

    template = GistTemplate(tokenizer, [], max_length=1 << 30)
    return [(len(p), len(t)) for p, t, _ in map(template.pieces, records)]


def format_table(result: dict) -> str:
    g, r, kv = result["gflops_per_example"], result["reduction_vs_none"], result["kv_bytes_per_prompt"]
    m = result["model"]
    lines = [
        f"model {m['name']}: {result['params'] / 1e9:.3f} B params, {result['shape']}",
        f"{result['examples']} example(s), mean instruction {result['mean_prompt_tokens']:.1f} tokens, "
        f"mean tail {result['mean_tail_tokens']:.1f} tokens, k={result['num_gist']} "
        f"(compression {result['compression']:.1f}x)"
        + (f", tokenizer {result['tokenizer']}" if "tokenizer" in result else ""),
        f"{'strategy':<12} {'GFLOPs/example':>15} {'vs none':>9} {'KV bytes/prompt (' + result['dtype'] + ')':>26}",
    ]
    for s in g:
        lines.append(f"{s:<12} {g[s]:>15.3f} {-r[s]:>+9.1%} {kv[s]:>26,.0f}")
    lines.append(
        "each further output token: "
        + ", ".join(f"{s} {v:.3f}" for s, v in result["gflops_next_token"].items())
        + " GFLOPs"
    )
    lines.append(
        "one-off cache build per prompt: "
        + ", ".join(f"{s} {v:.3f} GFLOPs" for s, v in result["gflops_build_cache"].items())
    )
    if result.get("prefix_tokens"):
        lines.append(
            f"mask_prefix=visible: the gist strategy also reads the {result['prefix_tokens']} fixed head "
            f"entries, kept once per model ({result['kv_bytes_shared']:,.0f} bytes), not per prompt"
        )
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    write_text(path, json.dumps(result, indent=2))


def measured_flops(
    model, prompt: list[int], tail: list[int], gist_ids: list[int], strategy: str, prefix: int = 0
) -> int:
    """FlopCounterMode's count of the first-token forward of one strategy on a real model.

    Load the model with attn_implementation="eager": its attention is two counted matmuls, while
    CPU sdpa dispatches to a fused kernel torch's counter has no formula for.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .strategies import first_token_input, forward_after, strategy_cache

    cache = strategy_cache(model, prompt, gist_ids, strategy, prefix)
    with FlopCounterMode(display=False) as counter:
        forward_after(model, first_token_input(prompt, tail, strategy), cache)
    return counter.get_total_flops()


def tokenizer_for(model: str, tokenizer: str = ""):
    """The model's own tokenizer when it has one, else SmolLM2's (shape files carry none)."""
    from transformers import AutoTokenizer

    name = tokenizer or model
    path = model_shape_path(name)
    if is_shape_file(path) or not (Path(path) / "tokenizer_config.json").is_file():
        name, path = "smollm2", resolve_model_path("smollm2")
    return AutoTokenizer.from_pretrained(path), name


def visible_prefix_tokens(model: str, tokenizer: str = "") -> int:
    """mask_prefix=visible: tokens of the Alpaca template's fixed head (BOS when the tokenizer adds one,
    "Instruction:") that every query of the gist strategy reads, in the model's tokenizer."""
    from ..data import GistTemplate

    if isinstance(shape_of(model), Seq2SeqShape):
        raise ConfigError(
            "--mask-prefix visible is for decoder-only models (encoder-decoder runs refuse mask_prefix=visible)"
        )
    return len(GistTemplate(tokenizer_for(model, tokenizer)[0], [], max_length=1 << 30).fixed_head)


def flops_for(model, num_gist, *, data="", prompt_tokens=0, tail_tokens=4, n=0, dtype="bf16", tokenizer="", prefix=0):
    """`gist-dist flops`: one prompt length, or the real lengths of a data file's records. `prefix`: the
    instruction's first tokens kept visible (mask_prefix=visible), counted inside its length."""
    if num_gist < 1:
        raise ConfigError(f"--num-gist must be >= 1, got {num_gist}")
    shape = shape_of(model)
    if data:
        records = load_records_for(data, n)  # bad data fails before the tokenizer loads
        tok, tok_name = tokenizer_for(model, tokenizer)
        lengths = prompt_lengths(records, tok)
        result = dataset_flops(shape, lengths, num_gist, dtype, prefix=prefix)
        result.update(tokenizer=tok_name, data=data)
        return result
    if prompt_tokens <= prefix or tail_tokens < 1:
        raise ConfigError(
            f"give --data FILE, or --prompt-tokens N (> {prefix}, the visible prefix) with --tail-tokens M (>= 1)"
        )
    return dataset_flops(shape, [(prompt_tokens, tail_tokens)], num_gist, dtype, prefix=prefix)


def load_eager(model: str, meta: bool = False, dtype=None):
    """The model with eager attention (counted matmuls). meta=True: no weights, for shapes of any size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = model_shape_path(model)
    dtype = dtype or torch.float32
    config = hf_config(model)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    if is_shape_file(path) or meta:
        torch.manual_seed(0)
        with torch.device("meta") if meta else torch.device("cpu"):
            net = auto.from_config(config, attn_implementation="eager", dtype=dtype).eval()
        return untie_lm_head(net) if isinstance(shape_of(model, config), Seq2SeqShape) else net
    return auto.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def untie_lm_head(net):
    """transformers 5 builds every T5 with lm_head tied to the embedding; a T5 v1.1 / FLAN-T5
    checkpoint has its own head (google/flan-t5-xxl: 11.135 B, not 11.004 B): give it one."""
    import torch

    if not shape_of("t5", net.config).tied and net.lm_head.weight is net.shared.weight:
        weight = torch.empty_like(net.shared.weight)
        net.lm_head.weight = torch.nn.Parameter(
            weight if weight.is_meta else weight.normal_(std=net.config.d_model**-0.5)
        )
    return net


def measured_seq2seq_flops(model, new: int, cached: int, seen: int) -> int:
    """FlopCounterMode's count of one T5 request up to its first output token (lengths only; ids zero).

    cached == 0: HF's own forward (encoder over `new` tokens, one decoder step from the start token).
    cached > 0 (gist cache): inference's own request path, inference.seq2seq.encode_after_cache, over a
    cache of `cached` kept gist positions (zeros: FLOPs depend on lengths only), then one decoder step
    over the `cached` + `new` encoder states. Building the cache is not counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..inference.seq2seq import Seq2SeqGistCache, encode_after_cache

    c, device, dtype = model.config, model.device, model.dtype
    ids = torch.zeros(1, new, dtype=torch.long, device=device)
    start = torch.zeros(1, 1, dtype=torch.long, device=device)
    kept = [torch.zeros(1, cached, c.d_model, device=device, dtype=dtype) for _ in range(c.num_layers + 1)]
    cache = Seq2SeqGistCache(kept[:-1], kept[-1], torch.zeros(1, dtype=torch.long), torch.full((1,), cached))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if cached == 0:
            model(input_ids=ids, decoder_input_ids=start, use_cache=False)
        else:
            states, _ = encode_after_cache(model, cache, [[0] * new])
            # no cross mask: HF builds it with .item(), which meta tensors refuse; it changes no matmul
            model(encoder_outputs=(states,), decoder_input_ids=start, use_cache=False)
    return counter.get_total_flops()


def check_against_counter(
    model: str, lengths: list[tuple[int, int]], num_gist: int, meta: bool = False, prefix: int = 0
) -> dict:
    """Analytic vs FlopCounterMode per strategy on forward passes of the model (token ids arbitrary:
    FLOPs depend on lengths only). Returns per strategy the summed analytic and measured FLOPs.
    `prefix`: the prompts' first tokens the gist strategy keeps visible (mask_prefix=visible)."""
    net = load_eager(model, meta=meta)
    shape = shape_of(model, net.config)
    gist_ids = list(range(shape.vocab - num_gist, shape.vocab))
    out = {s: {"analytic": 0, "measured": 0} for s in shape.strategies}
    for prompt, tail in lengths:
        p_ids, t_ids = list(range(10, 10 + prompt)), list(range(20, 20 + tail))
        for s, inputs in shape.strategy_inputs(prompt, tail, num_gist, prefix).items():
            out[s]["analytic"] += shape.first_token_flops(*inputs)
            out[s]["measured"] += (
                measured_seq2seq_flops(net, *inputs)
                if isinstance(shape, Seq2SeqShape)
                else measured_flops(net, p_ids, t_ids, gist_ids, s, prefix)
            )
    for s in shape.strategies:
        out[s]["rel_error"] = out[s]["analytic"] / out[s]["measured"] - 1
    return {
        "model": model,
        "weights": "meta (none)" if meta else "real",
        "examples": len(lengths),
        "strategies": list(shape.strategies),
        **out,
    }


def is_shape(model: str) -> bool:
    return is_shape_file(model_shape_path(model))


def load_records_for(data: str, n: int) -> list[dict]:
    from ..data import load_records

    return load_records(data, n=n)


def format_check(check: dict) -> str:
    lines = [f"FlopCounterMode check ({check['model']}, {check['weights']} weights, {check['examples']} example(s)):"]
    for s in check["strategies"]:
        c = check[s]
        lines.append(
            f"  {s:<12} analytic {c['analytic'] / 1e9:.4f} GFLOPs, measured {c['measured'] / 1e9:.4f} "
            f"GFLOPs, error {c['rel_error']:+.3%}"
        )
    return "\n".join(lines)
