"""The prepared GPU check, the Python half of benchmarks/gpu_check.sh (which installs the
carried wheels first). Only the public CLI (`gist-dist train/eval/compress/generate`) and the files a
run writes (metrics.jsonl, eval_outputs.jsonl) are used, so the trainer's internals can change freely.

    benchmarks/gpu_check.sh OUT_DIR              # one GPU: ~1.07B LLaMA shape, bf16, ZeRO-3 on 1 rank
    benchmarks/gpu_check.sh --dry-run OUT_DIR    # CPU: tiny shape, fp32, 2 steps (CI)

Steps, each logged and written into OUT_DIR/gpu_check.json as soon as it ends:
  tests       `pytest -m gpu` (skipped with their reason where CUDA is absent)
  peak        bf16 matmul FLOP/s measured here (fp32 on CPU): the MFU denominator
  model       random weights for the shape (configs/models/llama-1b.yaml) saved as an HF folder, so
              every command below loads the same base (no weights travel)
  gist, gist_ckpt, distill    1-rank ZeRO-3 trains (gist_ckpt: train.activation_checkpointing=true)
  eval        `gist-dist eval` of the distill run (gist KV cache) == `gist-dist generate` (the plain
              uncached loop under the gist mask), answer for answer
  compress    `gist-dist compress` + `gist-dist generate` with the artifact
  packed_dense, packed_flex   packed rows (2,048 tokens on the GPU) with the dense 4D mask and with
              FlexAttention's BlockMask (CUDA only): step time and peak memory, flex / dense
Per train variant: tokens/s (median of the steps after the first), peak memory (max over steps; the
GPU's max_memory_allocated there, RSS on CPU) and
  MFU = tokens/s * (6 N + 12 L h T) / peak    (PaLM appendix B, as nanoGPT's estimate_mfu)
with N the parameters a token's matmuls use (layers + LM head), L layers, h hidden, T the mean
sequence length. Distill counts the same 6N: teacher forward 2N + student forward 2N + student
backward through frozen weights (input gradients only) 2N. Recomputation under checkpointing is not
counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gist_dist.cli"]
WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "number group problem fact river stone cloud piano tiger lemon candle forest silver window rocket garden "
    "orange pencil marble castle dragon ocean violet summer winter bridge meadow falcon copper harbor"
).split()
INSTRUCTION = "Repeat the words of the input in reverse order."

# name -> settings; gpu: ~2.5k-token batches so the matmuls, not the launch, set the pace.
SETTINGS = {
    "gpu": dict(
        shape="configs/models/llama-1b.yaml",
        dtype="bf16",
        steps=8,
        micro_batch=8,
        max_length=512,
        words=(140, 100, 100),
        num_gist=4,
        eval_n=4,
        new_tokens=8,
        queries=8,
        deadline_s=460,
        timeout_s=240,
        packed=(2048, 2),
    ),
    "dry": dict(
        shape="configs/models/tiny.yaml",
        dtype="fp32",
        steps=2,
        micro_batch=2,
        max_length=64,
        words=(12, 8, 8),
        num_gist=2,
        eval_n=3,
        new_tokens=4,
        queries=4,
        deadline_s=0,
        timeout_s=300,
        packed=(128, 1),
    ),
}


class Check:
    """The JSON record, rewritten after every step, and the shared log."""

    def __init__(self, out: Path, dry: bool):
        self.out, self.t0 = out, time.time()
        self.result = {"dry_run": dry, "ok": False, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}

    def log(self, msg: str):
        print(f"[gpu_check {time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def set(self, key: str, value):
        self.result[key] = value
        self.write()

    def step(self, name: str, value: dict):
        self.result["steps"][name] = value
        self.write()

    def write(self):
        self.result["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2))
        os.replace(tmp, self.out / "gpu_check.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(check: Check, cmd: list, timeout: int, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run one command, its output into the log. A timeout kills its whole process group (torchrun's
    worker too, which would hold the GPU) and counts as a failure (rc 124)."""
    cmd = [str(c) for c in cmd]
    check.log("$ " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin or "", timeout=max(timeout, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, err = 124, err + f"\ntimed out after {timeout}s"
    for stream in (out, err):
        if stream.strip():
            print(stream.rstrip()[-6000:], flush=True)
    check.log(f"exit {rc}")
    return subprocess.CompletedProcess(cmd, rc, out, err)


def torchrun(args: list) -> list:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        free_port(),
        "-m",
        "gist_dist.cli",
        *args,
    ]


def matmul_peak(device: str, dtype: torch.dtype, n: int, iters: int) -> float:
    """FLOP/s of a square matmul loop on this device (the MFU denominator)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def build_model(shape_file: str, target: Path, dtype: torch.dtype, device: str) -> dict:
    """Random weights for a shape file, saved once as an HF folder (transformers alone)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {k: v for k, v in yaml.safe_load((ROOT / shape_file).read_text()).items() if k not in ("name", "notes")}
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(target)
    total = sum(p.numel() for p in model.parameters())
    del model
    embed = config.vocab_size * config.hidden_size
    return {
        "shape": shape_file,
        "params": total,
        "matmul_params": total - (0 if config.tie_word_embeddings else embed),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
    }


def write_data(work: Path, s: dict) -> dict:
    """Synthetic Alpaca records long enough to fill data.max_length; an eval set with one instruction
    (one `generate --instruction` call answers all of it) and a prompt for compress."""
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    n_ins, n_in, n_out = s["words"]
    train = [
        {"instruction": words(n_ins), "input": words(n_in), "output": words(n_out)}
        for _ in range(s["micro_batch"] * (s["steps"] + 2))
    ]
    inputs = [words(rng.randint(3, 6)) for _ in range(s["eval_n"])]
    evals = [{"instruction": INSTRUCTION, "input": x, "output": " ".join(x.split()[::-1])} for x in inputs]
    files = {"train": work / "train.jsonl", "eval": work / "eval.jsonl", "prompt": work / "system_prompt.txt"}
    for name, recs in (("train", train), ("eval", evals)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    files["prompt"].write_text("You are the help desk of a lending library. " + words(n_ins) + "\n")
    return files


def run_config(work: Path, s: dict, model_dir: Path, tokenizer: str, files: dict) -> Path:
    cfg = {
        "mask": "gist",
        "num_gist": s["num_gist"],
        "output_dir": str(work / "default"),
        "model": {"name": str(model_dir), "tokenizer": tokenizer, "dtype": s["dtype"]},
        "data": {"train": str(files["train"]), "eval": str(files["train"]), "max_length": s["max_length"]},
        "train": {
            "micro_batch_size": s["micro_batch"],
            "max_steps": s["steps"],
            "lr": 1e-4,
            "warmup_steps": 1,
            "eval_batches": 1,
        },
        "eval_max_new_tokens": s["new_tokens"],
        "eval_batch_size": 4,
    }
    path = work / "check.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_figures(run_dir: Path, model: dict, peak: float, micro_batch: int) -> dict:
    """tokens/s, peak memory and MFU from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r and "tokens_per_s" in r]
    timed = steps[1:] or steps  # the first step pays for warm-up
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    seq = statistics.fmean(r["tokens"] for r in steps) / micro_batch
    per_token = 6 * model["matmul_params"] + 12 * model["layers"] * model["hidden"] * seq
    return {
        "steps": len(steps),
        "tokens_per_step": steps[-1]["tokens"],
        "mean_seq_len": round(seq, 1),
        "tokens_per_s": tps,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in steps),
        "mfu": tps * per_token / peak,
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
    }


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, fp32, 2 steps")
    args = p.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on CPU", file=sys.stderr)
        return 2
    s = SETTINGS["dry" if dry else "gpu"]
    out = Path(args.out_dir).resolve()
    work = out / "work" if dry else Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_work"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, dry)
    device = "cpu" if dry else "cuda"
    check.set("device", torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
    check.set("torch", torch.__version__)
    tokenizer = os.environ.get("GPU_CHECK_TOKENIZER") or "smollm2"  # gpu_check.sh: the carried folder

    def left() -> int:
        """Seconds a command may take: its timeout, cut to what is left before the deadline (8 minutes on the GPU
        with the install and start before this script; the device tool stops a call at 10)."""
        return (
            int(min(s["timeout_s"], s["deadline_s"] - (time.time() - check.t0))) if s["deadline_s"] else s["timeout_s"]
        )

    def over_budget() -> bool:
        return left() < 45

    # 1. the gpu-marked tests
    t = time.time()
    proc = sh(
        check,
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            "-rs",
            "--continue-on-collection-errors",
            "tests/",
        ],
        timeout=left(),
    )
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    check.step(
        "tests",
        {
            "ok": proc.returncode in (0, 5) and "failed" not in summary and "error" not in summary,
            "summary": summary,
            "seconds": round(time.time() - t, 1),
        },
    )

    # 2. the MFU denominator
    dtype = torch.float32 if dry else torch.bfloat16
    peak = matmul_peak(device, dtype, 1024 if dry else 8192, 10 if dry else 50)
    check.set("peak_tflops", peak / 1e12)
    check.log(f"measured {dtype} matmul peak: {peak / 1e12:.2f} TFLOP/s")

    # 3. the base model and data
    model_dir = work / "model"
    model = build_model(s["shape"], model_dir, dtype, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    check.set("model", model)
    check.log(f"model {s['shape']}: {model['params']:,} parameters in {model_dir}")
    files = write_data(work, s)
    config = run_config(work, s, model_dir, tokenizer, files)

    def train_variant(name: str, extra: list, micro_batch: int):
        if over_budget():
            check.step(name, {"ok": False, "skipped": "time budget spent"})
            return
        t, run_dir = time.time(), work / name
        proc = sh(check, torchrun(["train", config, f"output_dir={run_dir}", *extra]), left())
        entry = {"ok": proc.returncode == 0, "seconds": round(time.time() - t, 1), "overrides": extra}
        if (run_dir / "metrics.jsonl").is_file():
            try:
                entry.update(train_figures(run_dir, model, peak, micro_batch))
            except (ValueError, KeyError, statistics.StatisticsError) as e:
                entry.update(ok=False, error=f"metrics.jsonl: {e!r}")
        entry["ok"] = entry["ok"] and finite(entry.get("tokens_per_s"), entry.get("peak_mem_gb"))
        check.step(name, entry)
        if name != "distill":  # 14 GB of optimizer shards at 1B: keep the disk free
            subprocess.run(["rm", "-rf", str(run_dir / "checkpoints"), str(run_dir / "final")])

    # 4. the train variants
    variants = {"gist": [], "gist_ckpt": ["train.activation_checkpointing=true"], "distill": ["objective=distill"]}
    for name, extra in variants.items():
        train_variant(name, extra, s["micro_batch"])

    # 5. eval of the distill run (gist KV cache) == generate (uncached), answer for answer
    distill_dir = work / "distill"
    if over_budget() or not check.result["steps"]["distill"]["ok"]:
        check.step("eval", {"ok": False, "skipped": "time budget spent or no distill run"})
    else:
        t = time.time()
        proc = sh(
            check,
            [
                *CLI,
                "eval",
                config,
                "objective=distill",
                f"output_dir={distill_dir}",
                f"data.eval_splits=check:{files['eval']}",
            ],
            left(),
        )
        entry = {"ok": False, "eval_seconds": round(time.time() - t, 1)}
        if proc.returncode == 0:
            outputs = [json.loads(x) for x in (distill_dir / "eval_outputs.jsonl").read_text().splitlines()]
            cached = [o["prediction"] for o in outputs]
            gen = sh(
                check,
                [
                    *CLI,
                    "generate",
                    "--gist",
                    distill_dir,
                    "--instruction",
                    INSTRUCTION,
                    "--max-new-tokens",
                    s["new_tokens"],
                ],
                left(),
                stdin="".join(o["input"] + "\n" for o in outputs),
            )
            # generate prints one answer a line; an answer may hold a newline itself, so the texts are compared whole
            uncached = gen.stdout if gen.returncode == 0 else None
            entry.update(
                n=len(cached),
                cached=cached,
                uncached=uncached,
                generate_s=json.loads((distill_dir / "eval.json").read_text())["splits"]["check"]["generate_s"],
            )
            entry["cached_equals_uncached"] = entry["ok"] = (
                bool(cached) and "".join(c + "\n" for c in cached) == uncached
            )
        entry["seconds"] = round(time.time() - t, 1)
        check.step("eval", entry)

    # 6. compress a prompt + generate with the artifact
    if over_budget():
        check.step("compress", {"ok": False, "skipped": "time budget spent"})
    else:
        t, run_dir = time.time(), work / "compress"
        proc = sh(
            check,
            torchrun(
                [
                    "compress",
                    "--prompt-file",
                    files["prompt"],
                    "--num-gist",
                    s["num_gist"],
                    "--num-queries",
                    s["queries"],
                    "--answer-tokens",
                    s["new_tokens"],
                    "--config",
                    config,
                    f"output_dir={run_dir}",
                ]
            ),
            left(),
        )
        entry = {"ok": proc.returncode == 0, "compress_seconds": round(time.time() - t, 1)}
        if proc.returncode == 0:
            entry.update(train_figures(run_dir, model, peak, s["micro_batch"]))
            try:
                entry["fidelity"] = json.loads(proc.stdout.strip().splitlines()[-1]).get("fidelity")
            except (json.JSONDecodeError, IndexError):
                pass
            gen = sh(
                check,
                [
                    *CLI,
                    "generate",
                    "--gist",
                    run_dir,
                    "--query",
                    "When are you open?",
                    "--max-new-tokens",
                    s["new_tokens"],
                ],
                left(),
            )
            entry.update(
                ok=gen.returncode == 0 and finite(entry["tokens_per_s"], entry["peak_mem_gb"]),
                answer=gen.stdout.strip(),
            )
        entry["seconds"] = round(time.time() - t, 1)
        check.step("compress", entry)

    # 7. packed rows, FlexAttention's BlockMask vs the dense 4D mask: same rows, same steps
    length, rows = s["packed"]
    packed = ["data.packing=true", f"data.max_length={length}", f"train.micro_batch_size={rows}"]
    train_variant("packed_dense", [*packed, "model.attention=dense"], rows)
    if device == "cuda":
        train_variant("packed_flex", [*packed, "model.attention=flex"], rows)
    else:
        check.step("packed_flex", {"ok": True, "skipped": "FlexAttention trains only on CUDA"})
    dense, flex = check.result["steps"]["packed_dense"], check.result["steps"]["packed_flex"]
    if "step_time_s" in dense and "step_time_s" in flex:
        check.set(
            "flex_vs_dense",
            {
                "step_time": flex["step_time_s"] / dense["step_time_s"],
                "peak_mem": flex["peak_mem_gb"] / dense["peak_mem_gb"],
            },
        )
        check.log(
            f"packed flex / dense: step time {check.result['flex_vs_dense']['step_time']:.3f}, "
            f"peak memory {check.result['flex_vs_dense']['peak_mem']:.3f}"
        )

    steps = check.result["steps"]
    check.log("variant      tokens/s    MFU     peak GB   seconds")
    for name in ("gist", "gist_ckpt", "distill", "compress", "packed_dense", "packed_flex"):
        e = steps.get(name, {})
        if "tokens_per_s" in e:
            check.log(
                f"{name:10s} {e['tokens_per_s']:10.1f} {e['mfu']:7.2%} {e['peak_mem_gb']:9.2f} {e['seconds']:9.1f}"
            )
        else:
            check.log(f"{name:10s} not measured ({e.get('skipped') or e.get('error') or 'failed'})")
    ev = steps.get("eval", {})
    check.log(f"eval: cached == uncached greedy answers ({ev.get('n')} queries): {ev.get('cached_equals_uncached')}")
    check.set("ok", all(e.get("ok") for e in steps.values()))
    check.log(f"ok={check.result['ok']}; {out / 'gpu_check.json'}")
    return 0 if check.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
