"""`gist-dist` console script: one entry point, one subcommand per job.

Bad input (config, data, files, artifacts) ends with one line on stderr and a non-zero exit:
2 for usage/config errors, 1 for data and file errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _env_defaults():
    # Quiet, offline-friendly defaults; users can override any of them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keeps stderr to what matters
    # DeepSpeed 0.19 calls torch's renamed collectives every step; one warning per call floods logs.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed finds the CPU too, but warns on every rank that it did
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def cmd_train(args) -> int:
    from .config import load_config
    from .trainer import run

    cfg = load_config(args.config, args.overrides)
    summary = run(cfg)
    from . import dist

    if dist.is_main():
        print(json.dumps(summary))
    return 0


def cmd_compress(args) -> int:
    from . import compress, dist
    from .config import load_config
    from .trainer import run

    overrides = [f"num_gist={args.num_gist}", *args.overrides]
    cfg = compress.prepare(
        load_config(args.config or compress.DEFAULT_CONFIG, overrides),
        args.prompt_file,
        args.queries,
        args.num_queries,
        args.answer_tokens,
        args.heldout,
        args.heldout_queries,
        args.checks,
    )
    dist.log(compress.plan_line(cfg))
    summary = run(cfg)
    compress.record_prompt_meta(cfg)
    if dist.is_main():
        from .fidelity import evaluate_heldout

        summary["fidelity"] = evaluate_heldout(cfg.output_dir)  # held-out queries vs the teacher
        print(json.dumps(summary))
        print(f"compress: {summary['fidelity']['verdict']}", flush=True)
        if summary["fidelity"]["warning"]:
            print(f"compress: {summary['fidelity']['warning']}", file=sys.stderr, flush=True)
    return 0


def cmd_generate(args) -> int:
    from .inference import GistModel

    gm = GistModel.load(args.gist, model_name=args.model)
    queries = [args.query] if args.query else [q for q in sys.stdin.read().splitlines() if q.strip()]
    for q in queries:
        print(gm.generate(q, instruction=args.instruction, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_export(args) -> int:
    from . import export
    from .config import ConfigError

    if not (args.peft or args.prompt_embeds):
        raise ConfigError("export needs --peft DIR and/or --prompt-embeds FILE")
    if args.peft:
        print(export.export_peft(args.run_dir, args.peft, model_name=args.model))
    if args.prompt_embeds:
        print(export.export_prompt_embeds(args.run_dir, args.prompt_embeds))
    return 0


def cmd_resolve_output(args) -> int:
    from .config import load_config

    print(load_config(args.config, args.overrides).output_dir)
    return 0


def cmd_summary(args) -> int:
    from .analysis.summary import summarize

    print(summarize(args.run_dir))
    return 0


def cmd_eval(args) -> int:
    from . import evaluation
    from .config import ConfigError, load_config

    if args.compare:
        from pathlib import Path

        comparison = evaluation.compare_runs(*args.compare)
        text = evaluation.format_comparison(comparison)
        if args.out:
            Path(args.out).write_text(text)
            Path(args.out).with_suffix(".json").write_text(json.dumps(comparison, indent=2))
        print(text, end="")
        return 0
    if not args.config:
        raise ConfigError("eval needs a CONFIG (or --compare GIST POS NEG)")
    result = evaluation.run_eval(load_config(args.config, args.overrides), zero3=args.zero3)
    if result is not None:
        print(evaluation.format_markdown(result), end="")
    return 0


def cmd_flops(args) -> int:
    from .analysis import flops, latency

    prefix = flops.visible_prefix_tokens(args.model, args.tokenizer) if args.mask_prefix == "visible" else 0
    sizes = {"prompt_tokens": args.prompt_tokens, "tail_tokens": args.tail_tokens, "prefix": prefix}
    result = flops.flops_for(
        args.model, args.num_gist, data=args.data, n=args.n, dtype=args.dtype, tokenizer=args.tokenizer, **sizes
    )
    text = [flops.format_table(result)]
    if args.measure:  # FlopCounterMode on forward passes; shape files run on the meta device (no weights)
        if args.data:  # the first 3 records: real forward passes are slow on big models
            lengths = flops.prompt_lengths(flops.load_records_for(args.data, 3), flops.tokenizer_for(args.model)[0])
        else:
            lengths = [(args.prompt_tokens, args.tail_tokens)]
        result["measured_check"] = flops.check_against_counter(
            args.model, lengths, args.num_gist, meta=flops.is_shape(args.model) or result["params"] > 1e9, prefix=prefix
        )
        text.append(flops.format_check(result["measured_check"]))
    if args.latency:
        result["latency"] = latency.latency_for(
            args.model, args.num_gist, data=args.data, n=args.latency_examples, repeats=args.repeats, **sizes
        )
        text.append(latency.format_latency(result["latency"]))
    if args.out:
        flops.write_json(result, args.out)
    print(json.dumps(result, indent=2) if args.json else "\n".join(text))
    return 0


def cmd_plan(args) -> int:
    from .analysis.plan import Setup, format_plan, plan, to_json

    setup = Setup(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        objective=args.objective,
        dtype=args.dtype,
        offload=args.offload,
        num_gist=args.num_gist,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        target_len=args.target_len,
        checkpointing=args.checkpointing,
        gpu_mem_gb=args.gpu_mem_gb,
    )
    result = plan(args.model, setup)
    print(to_json(result) if args.json else format_plan(result))
    return 0


def cmd_report(args) -> int:
    from .analysis.report import write_report

    out = write_report(args.run_dirs, args.out, args.peak_gflops, plots=not args.no_plots)
    print(f"{out / 'report.md'}\n{out / 'report.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gist-dist", description="Distributed gist-token trainer (DeepSpeed ZeRO-3)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train gist tokens (objective finetune|distill, mask gist|pos_control|neg_control)"
    )
    t.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("compress", help="distill one long prompt into K gist embeddings (frozen backbone)")
    c.add_argument("--prompt-file", required=True, help="text file holding the prompt to compress")
    c.add_argument("--num-gist", type=int, required=True, help="K, the number of gist tokens")
    c.add_argument(
        "--queries",
        help='file of training queries (one per line or JSONL {"query": ...}); default: sampled from the model itself',
    )
    c.add_argument("--num-queries", type=int, default=48, help="queries to sample when --queries is not given")
    c.add_argument("--answer-tokens", type=int, default=32, help="length of the teacher's answers")
    c.add_argument("--heldout", type=float, default=0.2, help="share of queries held out for evaluation")
    c.add_argument(
        "--heldout-queries",
        help="file of queries held out for evaluation, never trained on "
        "(same format as --queries); replaces --heldout's share",
    )
    c.add_argument(
        "--checks",
        help='JSONL task checks, one a line: {"query": ..., "contains": [...], "regex": ..., "json_keys": [...]}; '
        "scored for the teacher, the student and no prompt; their queries are held out",
    )
    c.add_argument(
        "--config", default=None, help="YAML run config (default: configs/compress.yaml, the best measured recipe)"
    )
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/sys-prompt")
    c.set_defaults(func=cmd_compress)
    g = sub.add_parser("generate", help="answer queries with a gist artifact in place of the prompt")
    g.add_argument("--gist", required=True, help="directory with gist.safetensors + gist_config.json")
    g.add_argument("--query", help="the query (default: one per line on stdin)")
    g.add_argument("--instruction", help="for artifacts trained with the instruction visible (gist mask)")
    g.add_argument("--model", help="base model (default: the one recorded in gist_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.set_defaults(func=cmd_generate)
    x = sub.add_parser("export", help="a no-prompt gist artifact as a PEFT PromptTuning adapter or prompt embeddings")
    x.add_argument("run_dir", help="directory with gist.safetensors + gist_config.json (compress / no_prompt distill)")
    x.add_argument("--peft", metavar="DIR", help="write adapter_config.json + adapter_model.safetensors here")
    x.add_argument("--prompt-embeds", metavar="FILE", help="write the [k, hidden] rows (safetensors) + layout here")
    x.add_argument("--model", help="base model (default: the one recorded in gist_config.json)")
    x.set_defaults(func=cmd_export)
    r = sub.add_parser("resolve-output", help="print the output_dir a config + overrides resolve to")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=cmd_resolve_output)
    f = sub.add_parser("flops", help="inference FLOPs, KV bytes (and measured latency) per caching strategy")
    f.add_argument(
        "--model",
        default="smollm2",
        help="llama-7b|llama-13b|llama-70b|flan-t5-xxl|tiny|t5-tiny|smollm2, a shape YAML, an HF folder or config.json",
    )
    f.add_argument("--num-gist", type=int, default=1)
    f.add_argument("--data", default="", help="Alpaca JSON/JSONL (or 'generated'): real prompt lengths")
    f.add_argument("-n", type=int, default=0, help="use the first N records of --data (0: all)")
    f.add_argument("--prompt-tokens", type=int, default=0, help="one instruction length instead of --data")
    f.add_argument(
        "--tail-tokens",
        type=int,
        default=3,
        help="input + '\\nOutput:' tokens with --prompt-tokens (3: no input, SmolLM2 tokenizer)",
    )
    f.add_argument("--tokenizer", default="", help="tokenizer for --data (default: the model's, else SmolLM2's)")
    f.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of stored KV")
    f.add_argument(
        "--mask-prefix",
        default="hidden",
        choices=["hidden", "visible"],
        help="visible: the gist strategy also reads the template's fixed head, stored once (mask_prefix=visible runs)",
    )
    f.add_argument("--measure", action="store_true", help="check against torch FlopCounterMode forward passes")
    f.add_argument("--latency", action="store_true", help="time TTFT/decode per strategy on this machine")
    f.add_argument("--latency-examples", type=int, default=4)
    f.add_argument("--repeats", type=int, default=10)
    f.add_argument("--json", action="store_true", help="print JSON instead of tables")
    f.add_argument("--out", default="", help="also write the JSON here (e.g. RUN_DIR/flops.json)")
    f.set_defaults(func=cmd_flops)
    pl = sub.add_parser("plan", help="ZeRO-3 memory per GPU (and comm volume) for a model shape, no weights")
    pl.add_argument(
        "--model", default="llama-7b", help="llama-7b|llama-13b|llama-70b|flan-t5-xxl, a shape YAML or HF config"
    )
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument(
        "--objective",
        default="finetune",
        help="finetune (the whole model trains) or distill (gist embeddings only)",
    )
    pl.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    pl.add_argument("--offload", default="none", help="none or cpu (params + optimizer states to host memory)")
    pl.add_argument("--num-gist", type=int, default=1)
    pl.add_argument("--micro-batch", type=int, default=1)
    pl.add_argument("--seq-len", type=int, default=512)
    pl.add_argument("--target-len", type=int, default=128, help="decoder tokens per example (T5 shapes)")
    pl.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    pl.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU in GiB")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
    rp = sub.add_parser("report", help="cluster report of runs: report.json, report.md, PNG plots")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one or more runs (several: ROUGE-L vs k)")
    rp.add_argument("--out", default=None, help="where to write (default: the first RUN_DIR)")
    rp.add_argument(
        "--peak-gflops",
        type=float,
        default=None,
        help="peak FLOP/s of the whole run in GFLOP/s (default: measure a fp32 matmul here)",
    )
    rp.add_argument("--no-plots", action="store_true")
    rp.set_defaults(func=cmd_report)
    s = sub.add_parser("summary", help="short summary of a training run (loss, tokens/s per rank, outputs)")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_summary)
    e = sub.add_parser(
        "eval",
        help="greedy answers from the gist KV cache, ROUGE-L / exact match per split "
        "(writes OUTPUT_DIR/eval.json, eval.md, eval_outputs.jsonl)",
    )
    e.add_argument("config", nargs="?", help="the run's YAML config; output_dir= names the trained run")
    e.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides (data.eval_splits=name:path,..., "
        "eval_max_new_tokens=, eval_batch_size=, data.num_eval=)",
    )
    e.add_argument("--zero3", action="store_true", help="partition the model with ZeRO-3 (generate with synced_gpus)")
    e.add_argument(
        "--compare",
        nargs=3,
        metavar=("GIST", "POS", "NEG"),
        help="instead: share of the neg->pos control gap that gist recovers, from three eval.json",
    )
    e.add_argument("--out", default="", help="with --compare: also write the table (and .json) here")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv=None) -> int:
    _env_defaults()
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    from .artifact import ArtifactError
    from .config import ConfigError
    from .data import DataError
    from .dist import LaunchError

    try:
        code = args.func(args) or 0
        from .dist import shutdown

        shutdown()
        return code
    except ConfigError as e:
        print(f"gist-dist: config error: {e}", file=sys.stderr)
        return 2
    except (DataError, ArtifactError, LaunchError, FileNotFoundError) as e:
        print(f"gist-dist: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a peer rank died or stalled: one line instead of a traceback
        from .dist import lost_peer_message

        message = lost_peer_message(e)
        if message is None:
            raise
        print(f"gist-dist: error: {message}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
