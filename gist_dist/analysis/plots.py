"""PNG plots for the cluster report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_curves(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in report["runs"]:
        name = Path(run["run_dir"]).name
        steps, loss = zip(*run["train"]["loss_curve"])
        (line,) = ax.plot(steps, loss, label=f"{name} train")
        if run["train"]["eval_curve"]:
            s, e = zip(*run["train"]["eval_curve"])
            ax.plot(s, e, "o--", color=line.get_color(), label=f"{name} eval")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend(fontsize=8)
    return _save(fig, path)


def throughput(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels, values = [], []
    for run in report["runs"]:
        for i, tps in enumerate(run["train"]["rank_tokens_per_s"]):
            labels.append(f"{Path(run['run_dir']).name}\nrank {i}")
            values.append(tps)
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set(ylabel="tokens/s (mean after step 1)", title="Throughput per rank")
    return _save(fig, path)


def strategies(flops: dict, path: Path) -> Path:
    """GFLOPs to first token, KV bytes per prompt and (when measured) TTFT, per caching strategy
    (the table's own strategies: decoder-only and T5 shapes have different ones)."""
    names = list(flops["gflops_per_example"])
    latency = flops.get("latency") or {}
    panels = [
        ("GFLOPs to first token", [flops["gflops_per_example"][s] for s in names]),
        ("KV bytes per prompt", [flops["kv_bytes_per_prompt"][s] for s in names]),
    ]
    if all(s in latency for s in names):
        panels.append(("TTFT ms (measured)", [latency[s]["ttft_ms"] for s in names]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:green"][: len(names)])
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{flops['model']['name']}, k={flops['num_gist']}, {flops['examples']} prompts", fontsize=10)
    return _save(fig, path)


def rouge_vs_gist(report: dict, path: Path) -> Path | None:
    """ROUGE-L against k, one line per eval split, when several runs with eval.json are given."""
    points: dict = {}
    for run in report["runs"]:
        k = run["train"]["num_gist"]
        for split, s in run["eval"].items():
            if isinstance(s.get("rouge_l"), (int, float)) and k:
                points.setdefault(split, []).append((k, s["rouge_l"]))
    if not any(len({k for k, _ in p}) > 1 for p in points.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, p in points.items():
        ks, rs = zip(*sorted(p))
        ax.plot(ks, rs, "o-", label=split)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="gist tokens k", ylabel="ROUGE-L", title="ROUGE-L vs number of gist tokens")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(report: dict, out: Path) -> list[Path]:
    written = [loss_curves(report, out / "loss.png"), throughput(report, out / "throughput.png")]
    first_flops = next((r["flops"] for r in report["runs"] if r["flops"] and "gflops_per_example" in r["flops"]), None)
    if first_flops:
        written.append(strategies(first_flops, out / "strategies.png"))
    rouge = rouge_vs_gist(report, out / "rouge_vs_gist.png")
    return written + ([rouge] if rouge else [])
