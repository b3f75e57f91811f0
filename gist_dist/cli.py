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
    # DeepSpeed 0.19 calls torch's renamed collectives every step; one warning per call floods logs.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.", category=FutureWarning)


def cmd_train(args) -> int:
    from .config import load_config
    from .train import run

    cfg = load_config(args.config, args.overrides)
    summary = run(cfg)
    from . import dist
    if dist.is_main():
        print(json.dumps(summary))
    return 0


def cmd_resolve_output(args) -> int:
    from .config import load_config
    print(load_config(args.config, args.overrides).output_dir)
    return 0


def cmd_summary(args) -> int:
    from .summary import summarize
    print(summarize(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gist-dist", description="Distributed gist-token trainer (DeepSpeed ZeRO-3)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train gist tokens (modes gist, pos_control, neg_control, distill)")
    t.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("resolve-output", help="print the output_dir a config + overrides resolve to")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=cmd_resolve_output)
    s = sub.add_parser("summary", help="short summary of a training run (loss, tokens/s per rank, outputs)")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_summary)
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
        return args.func(args) or 0
    except ConfigError as e:
        print(f"gist-dist: config error: {e}", file=sys.stderr)
        return 2
    except (DataError, ArtifactError, LaunchError, FileNotFoundError) as e:
        print(f"gist-dist: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
