"""Cluster report of one or more runs: report.json, report.md and PNG plots.

Reads only what training and evaluation already wrote in RUN_DIR (the report step is optional):
metrics.jsonl (rank 0 writes every rank's numbers), config.yaml, and when present eval.json
(`gist-dist eval`) and flops.json (`gist-dist flops ... --latency --out RUN_DIR/flops.json`).

MFU (Chowdhery et al. 2022, PaLM, appendix B) = achieved model FLOP/s / peak FLOP/s, with
    model FLOPs per trained token = 3 * forward FLOPs per token  (backward = 2 x forward)
    forward FLOPs per token at sequence length s = LINEAR + L*4*a*d*s + 2*h*V   (flops.py)
Distill runs do a teacher forward (1x) and a student forward and backward to the inputs only
(frozen weights: 2x): again 3 x forward. s is the mean real tokens per sequence, so padding
work is not credited. The peak is measured, not looked up: a fp32 matmul (n=2048) on this
machine with all its threads; CPU ranks of one host share those cores, so the peak of the run
is the peak of the host (pass --peak-gflops for GPUs or several hosts).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import yaml

from ..atomic import write_text
from .summary import read_metrics


def measure_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best of `repeats` fp32 n x n matmuls, 2 n^3 FLOPs each, with torch's default threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _read_json(path: Path) -> dict | None:
    """Optional inputs written by other steps: absent or unreadable means "not in the report"."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_config(run_dir: Path) -> dict:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def training_stats(rows: list[dict]) -> dict:
    start = next((r for r in rows if r.get("event") == "start"), {})
    steps = [r for r in rows if "step" in r and "rank_tokens_per_s" in r]
    if not steps:
        raise FileNotFoundError("metrics.jsonl has no training steps")
    timed = steps[1:] or steps  # step 1 includes warm-up (allocation, JIT)
    ranks = len(timed[0]["rank_tokens_per_s"])
    per_rank_tps = [statistics.fmean(r["rank_tokens_per_s"][i] for r in timed) for i in range(ranks)]
    per_rank_mem = [max(r["rank_peak_mem_gb"][i] for r in steps) for i in range(ranks)]
    return {
        "world_size": start.get("world_size", ranks),
        "objective": start.get("objective"),
        "mask": start.get("mask"),
        "num_gist": start.get("num_gist"),
        "launcher": start.get("launcher"),
        "trainable_params": start.get("trainable_params"),
        "steps": len(steps),
        "tokens_per_s": sum(per_rank_tps),
        "rank_tokens_per_s": per_rank_tps,
        "step_time_s_mean": statistics.fmean(r["step_time_s"] for r in timed),
        "step_time_s_median": statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_step": statistics.fmean(r["tokens"] for r in timed),
        "peak_mem_gb": max(per_rank_mem),
        "rank_peak_mem_gb": per_rank_mem,
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "loss_curve": [[r["step"], r["loss"]] for r in steps],
        "eval_curve": [[r["step"], r["eval_loss"]] for r in steps if "eval_loss" in r],
    }


def mfu(train: dict, cfg: dict, peak_gflops: float) -> dict:
    from .flops import Shape, forward_flops, shape_of

    model = (cfg.get("model") or {}).get("name", "smollm2")
    shape = shape_of(model)
    if not isinstance(shape, Shape):  # metrics count encoder and decoder tokens together: no per-token split
        return {
            "model": model,
            "mfu": None,
            "why": "not computed for encoder-decoder runs (the step's tokens "
            "are not split into encoder and decoder tokens)",
        }
    t = cfg.get("train") or {}
    sequences = t.get("micro_batch_size", 1) * t.get("grad_accum", 1) * train["world_size"]
    seq = max(1, round(train["tokens_per_step"] / sequences))
    per_token = 3 * forward_flops(shape, seq, 0, logits=seq) / seq
    achieved = train["tokens_per_s"] * per_token / 1e9
    return {
        "model": model,
        "mean_seq_tokens": seq,
        "train_gflops_per_token": per_token / 1e9,
        "achieved_gflops": achieved,
        "peak_gflops": peak_gflops,
        "mfu": achieved / peak_gflops,
    }


def visible_prefix(cfg: dict, tok) -> int:
    """Tokens of the fixed template head a mask_prefix=visible run kept visible (0: hidden)."""
    if cfg.get("mask_prefix", "hidden") != "visible" or cfg.get("mask", "gist") == "pos_control":
        return 0
    from ..data import GistTemplate

    return len(GistTemplate(tok, [], 1 << 30, template=(cfg.get("data") or {}).get("template", "alpaca")).fixed_head)


def analytic_flops(cfg: dict, run_dir: Path) -> dict | None:
    """flops.json from the run dir, else the analytic table on the run's eval prompts (tokenizer only)."""
    saved = _read_json(run_dir / "flops.json")
    if saved:
        return saved
    try:
        from ..data import load_records
        from ..model import resolve_dtype
        from .flops import dataset_flops, prompt_lengths, shape_of, tokenizer_for

        m, d = cfg.get("model") or {}, cfg.get("data") or {}
        tok, tok_name = tokenizer_for(m.get("name", "smollm2"), m.get("tokenizer", ""))
        records = load_records(
            d.get("eval", "generated"), n=d.get("num_eval", 0), role="eval", seed=d.get("seed", 0) + 1
        )
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[
            str(resolve_dtype(m.get("dtype", "auto"))).split(".")[-1]
        ]
        result = dataset_flops(
            shape_of(m.get("name", "smollm2")),
            prompt_lengths(records, tok),
            cfg.get("num_gist", 1),
            dtype,
            prefix=visible_prefix(cfg, tok),
        )
        result.update(tokenizer=tok_name, data=d.get("eval", "generated"))
        return result
    except (OSError, ValueError, KeyError) as e:  # a report without the table beats no report
        return {"error": f"{type(e).__name__}: {e}"}


def eval_splits(run_dir: Path) -> dict:
    ev = _read_json(run_dir / "eval.json") or {}
    out = {}
    for name, s in (ev.get("splits") or {}).items():
        if not isinstance(s, dict):
            continue
        rouge = s.get("rougeL", s.get("rouge_l"))
        out[name] = {
            "n": s.get("n"),
            "rouge_l": rouge,
            "exact_match": s.get("exact_match"),
            "prompt_tokens_mean": (s.get("prompt_tokens") or {}).get("mean"),
            "compression_mean": (s.get("compression_ratio") or {}).get("mean"),
            "kv_bytes_per_prompt": s.get("kv_bytes_per_prompt"),
        }
    return out


def build_report(run_dirs: list[str], peak_gflops: float | None = None) -> dict:
    if not run_dirs:
        raise FileNotFoundError("give at least one RUN_DIR")
    peak_source = "given (--peak-gflops)"
    if peak_gflops is None:
        import torch

        peak_gflops = measure_peak_gflops()
        peak_source = f"measured: fp32 matmul n=2048 on this host, {torch.get_num_threads()} threads (best of 5)"
    runs = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a run directory")
        cfg = run_config(d)
        train = training_stats(read_metrics(d))
        runs.append(
            {
                "run_dir": str(d),
                "train": train,
                "mfu": mfu(train, cfg, peak_gflops),
                "eval": eval_splits(d),
                "flops": analytic_flops(cfg, d),
            }
        )
    return {"runs": runs, "peak_gflops": peak_gflops, "peak_source": peak_source}


def format_markdown(report: dict, plots: list[str]) -> str:
    lines = [
        "# gist-dist cluster report",
        "",
        f"Peak: {report['peak_gflops']:.1f} GFLOP/s ({report['peak_source']}).",
        "",
    ]
    for run in report["runs"]:
        t, m = run["train"], run["mfu"]
        lines += [
            f"## {run['run_dir']}",
            "",
            f"{t['objective']} under the {t['mask']} mask, k={t['num_gist']}, "
            f"{t['world_size']} rank(s) via {t['launcher']}, "
            f"{t['steps']} steps, loss {t['first_loss']:.4f} -> {t['last_loss']:.4f}"
            + (f", eval loss {t['eval_curve'][-1][1]:.4f}" if t["eval_curve"] else ""),
            "",
            "| rank | tokens/s | peak memory GB |",
            "|---:|---:|---:|",
        ]
        lines += [
            f"| {i} | {tps:.1f} | {mem:.2f} |"
            for i, (tps, mem) in enumerate(zip(t["rank_tokens_per_s"], t["rank_peak_mem_gb"]))
        ]
        lines += [
            f"| total | {t['tokens_per_s']:.1f} | max {t['peak_mem_gb']:.2f} |",
            "",
            f"Step time {t['step_time_s_mean']:.3f} s mean, {t['step_time_s_median']:.3f} s median "
            f"(after step 1). " + _mfu_line(t, m),
            "",
        ]
        if run["eval"]:
            lines += [
                "| split | n | ROUGE-L | exact match | prompt tokens (mean) | compression (mean) |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {name} | {s['n']} | {_num(s['rouge_l'])} | {_num(s['exact_match'])} | "
                f"{_num(s['prompt_tokens_mean'], 1)} | {_num(s['compression_mean'], 1)} |"
                for name, s in run["eval"].items()
            ]
            lines.append("")
        else:
            lines += ["No eval.json in the run dir (run `gist-dist eval` for ROUGE-L and compression).", ""]
        lines += _flops_lines(run["flops"])
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _mfu_line(t: dict, m: dict) -> str:
    if m["mfu"] is None:
        return f"MFU {m['why']}."
    return (
        f"MFU {m['mfu']:.2%}: {m['achieved_gflops']:.2f} GFLOP/s achieved = {t['tokens_per_s']:.1f} tokens/s x "
        f"{m['train_gflops_per_token']:.4f} GFLOPs/token (3 x forward of {m['model']} at "
        f"{m['mean_seq_tokens']} tokens/sequence)."
    )


def _num(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def _flops_lines(f: dict | None) -> list[str]:
    if not f or "gflops_per_example" not in f:
        return [f"No FLOPs table ({(f or {}).get('error', 'nothing to compute it from')}).", ""]
    lat = f.get("latency") or {}
    lines = [
        f"Inference per example ({f['examples']} prompts, mean instruction {f['mean_prompt_tokens']:.1f} "
        f"tokens, k={f['num_gist']}, KV in {f['dtype']}"
        + (f", tokenizer {f['tokenizer']}" if "tokenizer" in f else "")
        + "):",
        "",
        "| strategy | GFLOPs to first token | vs none | KV bytes/prompt | TTFT ms | decode ms/token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in f["gflops_per_example"]:  # the family's strategies (decoder-only or T5)
        ls = lat.get(s) or {}
        lines.append(
            f"| {s} | {f['gflops_per_example'][s]:.4f} | {-f['reduction_vs_none'][s]:+.1%} | "
            f"{f['kv_bytes_per_prompt'][s]:,.0f} | {_num(ls.get('ttft_ms'), 2)} | "
            f"{_num(ls.get('decode_ms_per_token'), 2)} |"
        )
    return lines + [""]


def write_report(
    run_dirs: list[str], out_dir: str | None = None, peak_gflops: float | None = None, plots: bool = True
) -> Path:
    report = build_report(run_dirs, peak_gflops)
    out = Path(out_dir or run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        from .plots import write_plots

        written = write_plots(report, out)
    report["plots"] = [str(p) for p in written]
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", format_markdown(report, written))):
        write_text(out / name, text)
    return out
