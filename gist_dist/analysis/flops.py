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
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import write_text
from ..config import ConfigError
from ..inference import STRATEGIES
from ..model import ROOT, is_shape_file, llama_config_from_shape, resolve_model_path

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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


def model_shape_path(name: str) -> str:
    """"llama-7b" -> configs/models/llama-7b.yaml; anything else as model.resolve_model_path."""
    named = ROOT / "configs" / "models" / f"{name}.yaml"
    if named.is_file():
        return str(named)
    if name.endswith("config.json") and Path(name).is_file():
        return str(Path(name).parent)
    return resolve_model_path(name)


def hf_config(name: str):
    path = model_shape_path(name)
    if is_shape_file(path):
        return llama_config_from_shape(path)
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model {name!r}: no shape file, HF folder or config.json ({str(e).splitlines()[0]})") from None


def shape_of(name: str, config=None) -> Shape:
    if config is None and is_shape(name):  # plain YAML: no transformers import, answers in a second
        from types import SimpleNamespace
        from ..model import load_shape
        config = SimpleNamespace(**load_shape(model_shape_path(name)))
    c = config if config is not None else hf_config(name)
    text = getattr(c, "get_text_config", lambda: c)()
    heads = text.num_attention_heads
    return Shape(
        name=name, layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size, vocab=text.vocab_size,
        tied=bool(getattr(c, "tie_word_embeddings", False)))


def forward_flops(shape: Shape, new: int, past: int = 0, logits: int = 1) -> int:
    """Matmul FLOPs of one forward over `new` tokens with `past` cached tokens (formula above)."""
    attention = shape.layers * 4 * shape.heads * shape.head_dim * new * (past + new)
    return new * shape.linear_per_token + attention + logits * 2 * shape.hidden * shape.vocab


def strategy_inputs(prompt: int, tail: int, num_gist: int) -> dict:
    """(new tokens, cached tokens) of the first-token forward per strategy."""
    return {"none": (prompt + tail, 0), "instruction": (tail, prompt), "gist": (tail, num_gist)}


def example_flops(shape: Shape, prompt: int, tail: int, num_gist: int) -> dict:
    per = {s: forward_flops(shape, n, p) for s, (n, p) in strategy_inputs(prompt, tail, num_gist).items()}
    per["build_instruction_cache"] = forward_flops(shape, prompt, 0, logits=0)
    per["build_gist_cache"] = forward_flops(shape, prompt + num_gist, 0, logits=0)
    return per


def dataset_flops(shape: Shape, lengths: list[tuple[int, int]], num_gist: int, dtype: str = "bf16") -> dict:
    """Aggregate over real (prompt tokens, tail tokens) pairs: mean FLOPs, reduction, KV bytes."""
    if not lengths:
        raise ValueError("no examples to count FLOPs over")
    n = len(lengths)
    totals: dict = {}
    for prompt, tail in lengths:
        for key, value in example_flops(shape, prompt, tail, num_gist).items():
            totals[key] = totals.get(key, 0) + value
    mean = {k: v / n for k, v in totals.items()}
    mean_prompt = sum(p for p, _ in lengths) / n
    kv = shape.kv_bytes_per_token(dtype)
    return {
        "model": asdict(shape), "params": shape.params(), "num_gist": num_gist, "examples": n, "dtype": dtype,
        "mean_prompt_tokens": mean_prompt, "mean_tail_tokens": sum(t for _, t in lengths) / n,
        "compression": mean_prompt / num_gist,
        "gflops_per_example": {s: mean[s] / 1e9 for s in STRATEGIES},
        "gflops_build_cache": {"instruction": mean["build_instruction_cache"] / 1e9,
                               "gist": mean["build_gist_cache"] / 1e9},
        "reduction_vs_none": {s: 1 - totals[s] / totals["none"] for s in STRATEGIES},
        "kv_bytes_per_prompt": {"none": 0, "instruction": mean_prompt * kv, "gist": num_gist * kv},
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
        f"model {m['name']}: {result['params'] / 1e9:.3f} B params, L={m['layers']} h={m['hidden']} "
        f"heads={m['heads']}/{m['kv_heads']} I={m['intermediate']} V={m['vocab']} tied={m['tied']}",
        f"{result['examples']} example(s), mean instruction {result['mean_prompt_tokens']:.1f} tokens, "
        f"mean tail {result['mean_tail_tokens']:.1f} tokens, k={result['num_gist']} "
        f"(compression {result['compression']:.1f}x)" + (f", tokenizer {result['tokenizer']}" if "tokenizer" in result else ""),
        f"{'strategy':<12} {'GFLOPs/example':>15} {'vs none':>9} {'KV bytes/prompt (' + result['dtype'] + ')':>26}",
    ]
    for s in STRATEGIES:
        lines.append(f"{s:<12} {g[s]:>15.3f} {-r[s]:>+9.1%} {kv[s]:>26,.0f}")
    b = result["gflops_build_cache"]
    lines.append(f"one-off cache build per prompt: instruction {b['instruction']:.3f} GFLOPs, gist {b['gist']:.3f} GFLOPs")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    write_text(path, json.dumps(result, indent=2))


def measured_flops(model, prompt: list[int], tail: list[int], gist_ids: list[int], strategy: str) -> int:
    """FlopCounterMode's count of the first-token forward of one strategy on a real model.

    Load the model with attn_implementation="eager": its attention is two counted matmuls, while
    CPU sdpa dispatches to a fused kernel torch's counter has no formula for.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from ..inference import first_token_input, forward_after, strategy_cache

    prefix = strategy_cache(model, prompt, gist_ids, strategy)
    with FlopCounterMode(display=False) as counter:
        forward_after(model, first_token_input(prompt, tail, strategy), prefix)
    return counter.get_total_flops()


def tokenizer_for(model: str, tokenizer: str = ""):
    """The model's own tokenizer when it has one, else SmolLM2's (shape files carry none)."""
    from transformers import AutoTokenizer
    name = tokenizer or model
    path = model_shape_path(name)
    if is_shape_file(path) or not (Path(path) / "tokenizer_config.json").is_file():
        name, path = "smollm2", resolve_model_path("smollm2")
    return AutoTokenizer.from_pretrained(path), name


def flops_for(model: str, num_gist: int, *, data: str = "", prompt_tokens: int = 0, tail_tokens: int = 4,
              n: int = 0, dtype: str = "bf16", tokenizer: str = "") -> dict:
    """`gist-dist flops`: one prompt length, or the real lengths of a data file's records."""
    if num_gist < 1:
        raise ConfigError(f"--num-gist must be >= 1, got {num_gist}")
    shape = shape_of(model)
    if data:
        records = load_records_for(data, n)  # bad data fails before the tokenizer loads
        tok, tok_name = tokenizer_for(model, tokenizer)
        lengths = prompt_lengths(records, tok)
        result = dataset_flops(shape, lengths, num_gist, dtype)
        result.update(tokenizer=tok_name, data=data)
        return result
    if prompt_tokens < 1 or tail_tokens < 1:
        raise ConfigError("give --data FILE, or --prompt-tokens N (>= 1) with --tail-tokens M (>= 1)")
    return dataset_flops(shape, [(prompt_tokens, tail_tokens)], num_gist, dtype)


def load_eager(model: str, meta: bool = False, dtype=None):
    """The model with eager attention (counted matmuls). meta=True: no weights, for shapes of any size."""
    import torch
    from transformers import AutoModelForCausalLM
    path = model_shape_path(model)
    dtype = dtype or torch.float32
    if is_shape_file(path) or meta:
        config = hf_config(model)
        torch.manual_seed(0)
        with torch.device("meta") if meta else torch.device("cpu"):
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def check_against_counter(model: str, lengths: list[tuple[int, int]], num_gist: int, meta: bool = False) -> dict:
    """Analytic vs FlopCounterMode per strategy on forward passes of the model (token ids arbitrary:
    FLOPs depend on lengths only). Returns per strategy the summed analytic and measured FLOPs."""
    net = load_eager(model, meta=meta)
    shape = shape_of(model, net.config)
    gist_ids = list(range(shape.vocab - num_gist, shape.vocab))
    out = {s: {"analytic": 0, "measured": 0} for s in STRATEGIES}
    for prompt, tail in lengths:
        p_ids, t_ids = list(range(10, 10 + prompt)), list(range(20, 20 + tail))
        for s, (new, past) in strategy_inputs(prompt, tail, num_gist).items():
            out[s]["analytic"] += forward_flops(shape, new, past)
            out[s]["measured"] += measured_flops(net, p_ids, t_ids, gist_ids, s)
    for s in STRATEGIES:
        out[s]["rel_error"] = out[s]["analytic"] / out[s]["measured"] - 1
    return {"model": model, "weights": "meta (none)" if meta else "real", "examples": len(lengths), **out}


def is_shape(model: str) -> bool:
    return is_shape_file(model_shape_path(model))


def load_records_for(data: str, n: int) -> list[dict]:
    from ..data import load_records
    return load_records(data, n=n)


def format_check(check: dict) -> str:
    lines = [f"FlopCounterMode check ({check['model']}, {check['weights']} weights, {check['examples']} example(s)):"]
    for s in STRATEGIES:
        c = check[s]
        lines.append(f"  {s:<12} analytic {c['analytic'] / 1e9:.4f} GFLOPs, measured {c['measured'] / 1e9:.4f} "
                     f"GFLOPs, error {c['rel_error']:+.3%}")
    return "\n".join(lines)
