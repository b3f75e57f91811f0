"""ZeRO-3 memory planner (per GPU) and communication volume per step, from a model shape alone.

Model states per GPU, W = nodes * gpus_per_node GPUs, N parameters, T of them trainable
(gist: T = N; distill: T = k * hidden, the gist embeddings only), p = bytes of the run dtype:
    parameters   p * N / W         every parameter, partitioned (ZeRO-3)
    gradients    4 * T / W         the fp32 gradient partition the optimizer steps on
    optimizer    (8 + m) * T / W   Adam's two fp32 moments, plus an fp32 master copy (m = 4) when p < 4
    working      (p + p_g) * Lmax  the largest module gathered whole (params, and its grads before the
                                   reduce-scatter when it trains: p_g = p when fine-tuning, 0 in distill)
With bf16 and full training that is 18 bytes per parameter / W + 4 * Lmax: DeepSpeed's own estimator
(deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs) uses the same 18, i.e. the
ZeRO paper's 16 bytes (Rajbhandari et al. 2020, K = 12) with the gradient held in fp32 instead of
fp16. Offload "cpu" (ZeRO-Infinity to CPU, params and optimizer) moves parameters, gradients and
optimizer states to host memory; the GPU keeps the working set.

Activations per GPU for micro batch b and sequence s, bf16, flash/sdpa attention (no s^2 scores),
counted as the tensors autograd saves per LLaMA layer and token (after Korthikanti et al. 2022, who
do the same count for GPT): RMSNorm inputs and outputs 4h, q, k, v a*d + 2*g*d, attention output a*d,
SwiGLU gate, up, silu(gate) and their product 4I:
    per layer  p * b * s * (4h + 2*a*d + 2*g*d + 4I)
    logits     8 * b * s * V            fp32 logits and log-softmax of the loss
With activation checkpointing each layer keeps only its input (p*b*s*h) and one layer is recomputed
at a time. Not counted: DeepSpeed's prefetch/reduce buckets, the CUDA context and allocator
fragmentation; "fits" therefore keeps 10% of the GPU free. tests/test_plan.py measures the saved
tensors of a real forward (sdpa, causal): 1.02 x this count; a 4D float mask 1.07 x, eager 1.24 x.

Encoder-decoder (T5 / FLAN-T5, flops.Seq2SeqShape: E encoder and D decoder layers, n = heads*d_kv,
F = d_ff): model states and communication are the formulas above over all encoder and decoder
parameters (cross-attention included). Activations for s encoder and t decoder tokens per example
(`target_len`), counted from the tensors autograd saves per T5 layer and token (tests/test_plan.py):
each T5LayerNorm 3h (input, x*rsqrt, output), attention q, k, v and output 4n, the gated-GELU FFN 7F
(wi_0, wi_1, the four intermediates of gelu_new's tanh formula, their product; ReLU FFN: F):
    encoder layer  p * b * s * (6h + 4n + 7F)
    decoder layer  p * b * t * (9h + 6n + 7F) + p * b * s * 2n   (3 norms, self + cross q/out; the
                                                                cross keys/values of the s encoder states)
    final norms    p * b * (s + t) * 3h,  logits 8 * b * t * V
with a memory-efficient sdpa kernel on GPU (no s x s probabilities). On CPU T5's self-attention (a
float relative-position bias) takes sdpa's math path, which also keeps b*heads*s^2 per layer.
Checkpointing keeps each layer's input (p*b*s*h per encoder, p*b*t*h per decoder layer) plus one layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..config import ConfigError
from .flops import DTYPE_BYTES, Seq2SeqShape, Shape, shape_of

GiB = 2**30
RESERVE = 0.10  # share of GPU memory kept for the CUDA context, buckets and fragmentation


@dataclass
class Setup:
    nodes: int = 1
    gpus_per_node: int = 8
    objective: str = "finetune"  # finetune: every weight trains; distill: only the gist rows
    dtype: str = "bf16"
    offload: str = "none"
    num_gist: int = 1
    micro_batch: int = 1
    seq_len: int = 512
    target_len: int = 128  # decoder tokens per example (encoder-decoder shapes only)
    checkpointing: bool = False
    gpu_mem_gb: float = 80.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> Setup:
        checks = [
            (self.nodes >= 1 and self.gpus_per_node >= 1, "--nodes and --gpus-per-node must be >= 1"),
            (
                self.objective in ("finetune", "distill"),
                f"--objective must be finetune or distill, got {self.objective!r}",
            ),
            (self.dtype in DTYPE_BYTES, f"--dtype must be one of {', '.join(DTYPE_BYTES)}"),
            (self.offload in ("none", "cpu"), f"--offload must be none or cpu, got {self.offload!r}"),
            (
                self.num_gist >= 1 and self.micro_batch >= 1 and self.seq_len >= 1 and self.target_len >= 1,
                "--num-gist, --micro-batch, --seq-len and --target-len must be >= 1",
            ),
            (self.gpu_mem_gb > 0, "--gpu-mem-gb must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def trainable_params(shape: Shape | Seq2SeqShape, objective: str, num_gist: int) -> int:
    return shape.params() if objective == "finetune" else num_gist * shape.hidden


def model_states(shape: Shape | Seq2SeqShape, setup: Setup) -> dict:
    """Bytes of parameters, gradients, optimizer states and the gathered working set (see above)."""
    p, w = DTYPE_BYTES[setup.dtype], setup.world
    n, t = shape.params(), trainable_params(shape, setup.objective, setup.num_gist)
    master = 4 if p < 4 else 0
    sharded = {"parameters": p * n / w, "gradients": 4 * t / w, "optimizer": (8 + master) * t / w}
    working = (p + (p if setup.objective == "finetune" else 0)) * shape.largest_module_params()
    gpu = (
        {**sharded, "working": working}
        if setup.offload == "none"
        else {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0, "working": working}
    )
    cpu_per_node = sum(sharded.values()) * setup.gpus_per_node if setup.offload == "cpu" else 0.0
    return {"gpu": gpu, "gpu_total": sum(gpu.values()), "cpu_per_node": cpu_per_node}


def layer_activations(shape: Shape, setup: Setup) -> float:
    """Bytes one decoder layer saves for backward (sdpa: no s x s scores)."""
    p, tokens = DTYPE_BYTES[setup.dtype], setup.micro_batch * setup.seq_len
    h, a, g, d, i = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate
    return p * tokens * (4 * h + 2 * a * d + 2 * g * d + 4 * i)


def seq2seq_layer_activations(shape: Seq2SeqShape, setup: Setup) -> tuple[float, float]:
    """Bytes one encoder layer and one decoder layer save for backward (see the module docstring)."""
    p, b, s, t = DTYPE_BYTES[setup.dtype], setup.micro_batch, setup.seq_len, setup.target_len
    h, n, ffn = shape.hidden, shape.inner, (7 if shape.gated else 1) * shape.ff
    return p * b * s * (6 * h + 4 * n + ffn), p * b * t * (9 * h + 6 * n + ffn) + p * b * s * 2 * n


def seq2seq_activations(shape: Seq2SeqShape, setup: Setup) -> float:
    p, b, s, t, h = DTYPE_BYTES[setup.dtype], setup.micro_batch, setup.seq_len, setup.target_len, shape.hidden
    encoder, decoder = seq2seq_layer_activations(shape, setup)
    rest = p * b * (s + t) * 3 * h + 8 * b * t * shape.vocab  # final norms (the encoder output among them), logits
    if setup.checkpointing:
        inputs = p * b * h * (shape.encoder_layers * s + shape.decoder_layers * t)
        return inputs + max(encoder, decoder) + rest
    return shape.encoder_layers * encoder + shape.decoder_layers * decoder + rest


def activations(shape: Shape | Seq2SeqShape, setup: Setup) -> float:
    if isinstance(shape, Seq2SeqShape):
        return seq2seq_activations(shape, setup)
    p, tokens = DTYPE_BYTES[setup.dtype], setup.micro_batch * setup.seq_len
    h = shape.hidden
    per_layer = layer_activations(shape, setup)
    logits = 8 * tokens * shape.vocab
    if setup.checkpointing:
        return shape.layers * p * tokens * h + per_layer + logits
    return shape.layers * per_layer + logits


def comm_bytes_per_step(
    shape: Shape | Seq2SeqShape,
    objective: str,
    world: int,
    dtype: str = "bf16",
    micro_batches: int = 1,
    num_gist: int = 1,
) -> dict:
    """Bytes each rank sends (and receives) per optimizer step under ZeRO-3, ring collectives.

    A ring all-gather or reduce-scatter of a B-byte buffer moves B * (W-1)/W per rank. Per micro batch:
      all-gather of all parameters for each forward pass (gist: 1; distill: 2, teacher and student
      run through the same partitioned backbone) and once more in backward (distill too: the
      gradient reaches the gist embeddings at the input through every frozen layer);
      reduce-scatter of the trainable gradients (gist: all N; distill: k * hidden).
    DeepSpeed reduces gradients at every micro batch's backward, so both scale with micro_batches.
    """
    p, ring = DTYPE_BYTES[dtype], (world - 1) / world
    forwards = 1 if objective == "finetune" else 2
    gather = (forwards + 1) * shape.params() * p * ring * micro_batches
    scatter = trainable_params(shape, objective, num_gist) * p * ring * micro_batches
    return {
        "all_gather": gather,
        "reduce_scatter": scatter,
        "total": gather + scatter,
        "forward_passes": forwards,
        "world": world,
        "dtype": dtype,
    }


def plan(model: str, setup: Setup) -> dict:
    setup.validate()
    shape = shape_of(model)
    states = model_states(shape, setup)
    act = activations(shape, setup)
    total = states["gpu_total"] + act
    return {
        "model": model,
        "shape": shape.describe(),
        "params": shape.params(),
        "tokens": f"{setup.seq_len} encoder + {setup.target_len} decoder tokens"
        if isinstance(shape, Seq2SeqShape)
        else f"{setup.seq_len} tokens",
        "largest_module_params": shape.largest_module_params(),
        "trainable_params": trainable_params(shape, setup.objective, setup.num_gist),
        "setup": setup.__dict__,
        "world": setup.world,
        "gpu_bytes": {**states["gpu"], "activations": act},
        "gpu_model_states": states["gpu_total"],
        "gpu_total": total,
        "cpu_bytes_per_node": states["cpu_per_node"],
        "fits": total <= (1 - RESERVE) * setup.gpu_mem_gb * GiB,
        "comm_bytes_per_step": comm_bytes_per_step(shape, setup.objective, setup.world, setup.dtype, 1, setup.num_gist),
    }


def format_plan(r: dict) -> str:
    s, g = r["setup"], r["gpu_bytes"]
    lines = [
        f"{r['model']}: {r['params'] / 1e9:.3f} B params "
        f"({r['trainable_params']:,} trainable, objective {s['objective']}), "
        f"ZeRO-3 over {s['nodes']} node(s) x {s['gpus_per_node']} GPU(s) = {r['world']}, "
        f"{s['dtype']}, offload {s['offload']}",
        f"per GPU (GiB): parameters {g['parameters'] / GiB:.2f}, gradients {g['gradients'] / GiB:.2f}, "
        f"optimizer {g['optimizer'] / GiB:.2f}, gathered working set {g['working'] / GiB:.2f}",
        f"  model states {r['gpu_model_states'] / GiB:.2f} GiB + activations {g['activations'] / GiB:.2f} GiB "
        f"(micro batch {s['micro_batch']} x {r['tokens']}, checkpointing {'on' if s['checkpointing'] else 'off'})"
        f" = {r['gpu_total'] / GiB:.2f} GiB",
    ]
    if s["offload"] == "cpu":
        lines.append(f"  host memory per node for offloaded states: {r['cpu_bytes_per_node'] / GiB:.2f} GiB")
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {s['gpu_mem_gb']:g} GiB per GPU (keeping {RESERVE:.0%} free)")
    c = r["comm_bytes_per_step"]
    lines.append(
        f"communication per rank per micro batch: all-gather {c['all_gather'] / GiB:.2f} GiB, "
        f"reduce-scatter {c['reduce_scatter'] / GiB:.4f} GiB"
    )
    return "\n".join(lines)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2)
