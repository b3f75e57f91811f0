"""Peak memory of one SmolLM2 distill step (forward + backward), full-vocabulary logits vs logits only
at the response positions (what gist_dist.methods.distill.DistillLoss does).

    .venv/bin/python benchmarks/logit_memory.py [--batch 4] [--tokens 256] [--repeats 3]

Each variant runs in its own fresh process (peak RSS is per process and never goes down); the
process reports its RSS after loading the model and its peak after the step. Printed: per variant
the step's memory above the loaded model (median over repeats) and the ratio rows / full.
Synthetic token ids (memory depends on shapes only): teacher rows are `tokens` long with the last
half labelled, the student's prompt is replaced by one gist token.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

GIB = 2**30


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kb * 1024 / GIB


def one_step(variant: str, batch: int, tokens: int) -> dict:
    import torch
    import torch.nn.functional as F

    from gist_dist.config import ModelConfig
    from gist_dist.data import IGNORE
    from gist_dist.masks import model_inputs
    from gist_dist.methods.distill import DistillLoss
    from gist_dist.model import load_model, load_tokenizer
    from gist_dist.tokens import add_gist_tokens

    torch.manual_seed(0)
    tok = load_tokenizer(ModelConfig(name="smollm2"))
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, 1)
    model = load_model(ModelConfig(name="smollm2", dtype="fp32"), vocab_min=num_old)
    module = DistillLoss(model, gist_ids, model.get_input_embeddings().weight.mean(0, keepdim=True))
    answer = tokens // 2
    ids = torch.randint(100, num_old, (batch, tokens))
    labels_t = torch.full_like(ids, IGNORE)
    labels_t[:, -answer:] = ids[:, -answer:]
    s_ids = torch.cat([torch.full((batch, 1), gist_ids[0]), ids[:, -answer - 3 :]], 1)  # gist + tail + answer
    labels_s = torch.full_like(s_ids, IGNORE)
    labels_s[:, -answer:] = ids[:, -answer:]
    ones = lambda t: {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": None}  # noqa: E731
    teacher = model_inputs(ones(ids), gist_ids, "pos_control")
    student = model_inputs(ones(s_ids), gist_ids, "gist")
    loaded = rss_gib()
    targets = int((labels_s[:, 1:] != IGNORE).sum())
    if variant == "rows":
        loss = module(teacher=teacher, student=student, labels_t=labels_t, labels_s=labels_s) / targets
    else:  # the loss as first written (2026-11): full [B, T, V] logits, response rows picked afterwards

        def rows(logits, labels):
            pos = torch.zeros_like(labels, dtype=torch.bool)
            pos[:, :-1] = labels[:, 1:] != IGNORE
            return logits[pos]

        with torch.no_grad():
            t_rows = rows(model(**teacher).logits, labels_t)
        embeds = module.gist_rows(student["input_ids"], model.get_input_embeddings())
        masks = {k: v for k, v in student.items() if k != "input_ids"}
        s_logits = model(inputs_embeds=embeds, **masks).logits
        t, s = t_rows.float() / 1.0, rows(s_logits, labels_s).float() / 1.0  # temperature 1, as then
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        loss = kl.mean()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return {"variant": variant, "loaded_gib": loaded, "peak_gib": peak, "step_gib": peak - loaded, "loss": float(loss)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", default="")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(one_step(args.worker, args.batch, args.tokens)))
        return
    runs = {"full": [], "rows": []}
    for _ in range(args.repeats):
        for variant in runs:  # alternate, so drift on the machine hits both
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    variant,
                    "--batch",
                    str(args.batch),
                    "--tokens",
                    str(args.tokens),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"SmolLM2-135M distill step, fp32, batch {args.batch} x {args.tokens} tokens, {args.repeats} runs per variant"
    )
    med = {}
    for variant, rs in runs.items():
        med[variant] = statistics.median(r["step_gib"] for r in rs)
        each = ", ".join(f"{r['step_gib']:.3f}" for r in rs)
        print(
            f"  {variant:5s} step memory above the loaded model: median {med[variant]:.3f} GiB "
            f"(runs {each}), peak RSS median "
            f"{statistics.median(r['peak_gib'] for r in rs):.3f} GiB, loss {rs[0]['loss']:.4f}"
        )
    print(f"  ratio rows / full (step memory) = {med['rows'] / med['full']:.3f}")


if __name__ == "__main__":
    main()
