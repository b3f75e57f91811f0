"""Distributed evaluation of a trained run: gist KV cache -> greedy answers -> ROUGE-L and compression.

    gist-dist eval configs/tiny.yaml output_dir=DIR                      # one process
    torchrun --nproc_per_node 2 .venv/bin/gist-dist eval configs/tiny.yaml output_dir=DIR
    torchrun --nproc_per_node 2 .venv/bin/gist-dist eval configs/tiny.yaml output_dir=DIR --zero3
    gist-dist eval --compare RUN_gist RUN_pos_control RUN_neg_control  # share of the gap recovered

The run's model is DIR/final/ (gist modes) or the base model + DIR/gist.safetensors (distill). It is
replicated on every rank, or partitioned with ZeRO-3 (`--zero3`, generate with synced_gpus).
Records are sorted by prompt length and cut into batches once, globally; rank r takes batches
r, r + world, ... so every batch (and so every answer) is the same at any world size; rank 0
gathers the answers back into the original order, scores them and writes DIR/eval.json,
DIR/eval.md and DIR/eval_outputs.jsonl.

eval.json: {run, mode, num_gist, model, world_size, zero3, max_new_tokens, batch_size,
  splits: {NAME: {source, n, dropped_overlong, generate_s, rougeL, rouge1, rouge2, exact_match,
                  prompt_tokens: {mean, median, max}, compression_ratio: {mean, median, max},
                  kv_bytes_per_prompt: {cached, full_prompt}}}}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist
from .cache import build_cache, generate_from_cache
from .config import ModelConfig, RunConfig
from .data import DataError, DataStats, GistTemplate, load_records

ROUGE_MODULE = Path(__file__).resolve().parent / "metrics" / "rouge.py"
CONTROL_MODES = ("gist", "pos_control", "neg_control")


@dataclass
class EvalModel:
    model: torch.nn.Module
    tok: object
    gist_ids: list[int]
    mode: str  # mask the run was trained with: decides which cache entries are kept
    embed: object = None  # distill: splices the trained gist rows in
    source: str = ""


def eval_splits(cfg: RunConfig) -> dict[str, str]:
    """Named evaluation sets: data.eval_splits, else the generated seen / unseen task families."""
    return dict(cfg.data.eval_splits) or {"seen": "generated:seen", "unseen": "generated:unseen"}


def _load_backbone(model_cfg: ModelConfig, ds_config, vocab_min: int = 0):
    """from_pretrained, under zero.Init when a ZeRO-3 config is given (no rank holds the whole model)."""
    from transformers.integrations import HfDeepSpeedConfig

    from .model import load_model
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config else None  # noqa: F841
    model = load_model(model_cfg, vocab_min=vocab_min).eval()
    if ds_config:
        import deepspeed
        model = deepspeed.initialize(model=model, config=ds_config)[0].module.eval()
    return model


def load_run_model(cfg: RunConfig, zero3: bool = False) -> EvalModel:
    """That run's model: OUTPUT_DIR/final/ (gist modes) or base model + gist.safetensors (distill)."""
    from transformers import AutoTokenizer

    from . import artifact
    out = Path(cfg.output_dir)
    ds_config = _zero3_config(cfg) if zero3 else None
    final = out / "final"
    if (final / "gist_config.json").is_file():
        meta = json.loads((final / "gist_config.json").read_text())
        tok = AutoTokenizer.from_pretrained(final)
        gist_ids = tok.convert_tokens_to_ids(meta["gist_tokens"])
        model_cfg = ModelConfig(name=str(final), dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
        return EvalModel(_load_backbone(model_cfg, ds_config), tok, gist_ids, meta["mode"], source=str(final))
    if (out / artifact.WEIGHTS).is_file():
        return _load_distilled(cfg, out, ds_config)
    raise FileNotFoundError(f"{out}: no trained model here (neither final/ nor {artifact.WEIGHTS}); train into it first")


def _load_distilled(cfg: RunConfig, out: Path, ds_config) -> EvalModel:
    from . import artifact
    from .distill import GistDistiller
    from .gist import add_gist_tokens
    from .model import load_tokenizer, local_device
    from .train import gather_context

    meta = artifact.load(out)[1]
    model_cfg = ModelConfig(name=meta.get("base_model", cfg.model.name), tokenizer=meta.get("tokenizer", ""),
                            dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation, seed=cfg.model.seed)
    tok = load_tokenizer(model_cfg)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, meta["num_gist"])
    model = _load_backbone(model_cfg, ds_config, vocab_min=num_old)
    weight = model.get_input_embeddings().weight
    with gather_context(3 if ds_config else 0)([weight]):  # the check reads the whole embedding
        gist = artifact.load(out, expected_fingerprint=artifact.BaseModel(model.config, weight))[0]
    gist = gist.to(local_device(), weight.dtype)
    distiller = GistDistiller(model, gist_ids, gist).eval()
    return EvalModel(model, tok, gist_ids, "gist", embed=distiller.embed, source=f"{model_cfg.name} + {out / artifact.WEIGHTS}")


def _zero3_config(cfg: RunConfig) -> dict:
    from .engine import deepspeed_config
    from .model import resolve_dtype
    from .train import hidden_size_of
    stage3 = dataclasses.replace(cfg, zero=dataclasses.replace(cfg.zero, stage=3))
    return deepspeed_config(stage3, hidden_size_of(cfg), resolve_dtype(cfg.model.dtype))


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Record indices in batches of similar length (less padding); the same batches at any world size."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_answers(em: EvalModel, examples: list[dict], batch_size: int, max_new_tokens: int,
                     synced: bool = False) -> list[dict]:
    """Greedy answers for `examples` ({"prompt": ids incl. gist, "tail": ids}) sharded over ranks;
    every rank returns all of them in the original order (with the KV bytes of each prompt's cache)."""
    rank, world = dist.rank(), dist.world()
    batches = plan_batches([len(e["prompt"]) + len(e["tail"]) for e in examples], batch_size)
    mine = batches[rank::world]
    if synced:  # ZeRO-3: every rank must run the same number of forwards; extra batches are discarded
        mine += [batches[0]] * (math.ceil(len(batches) / world) - len(mine))
    results = {}
    for n, batch in enumerate(mine):
        prompts = [examples[i]["prompt"] for i in batch]
        cache = build_cache(em.model, prompts, em.gist_ids, em.mode, embed=em.embed)
        answers = generate_from_cache(em.model, cache, [examples[i]["tail"] for i in batch], max_new_tokens,
                                      em.tok.eos_token_id, em.tok.pad_token_id, synced_gpus=synced)
        if n >= len(batches[rank::world]):
            continue
        for i, ids, kv, full in zip(batch, answers, cache.nbytes(), cache.full_prompt_nbytes()):
            results[i] = {"answer_ids": ids, "kv_bytes": kv, "full_prompt_kv_bytes": full}
    merged = {}
    for part in dist.all_gather_object(results):
        merged.update(part)
    return [merged[i] for i in range(len(examples))]


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of answers equal to the reference up to case and whitespace."""
    return sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references)) / max(len(references), 1)


def rouge(predictions: list[str], references: list[str]) -> dict:
    """ROUGE F-measures through `evaluate` with the local module (no hub)."""
    import evaluate
    return evaluate.load(str(ROUGE_MODULE)).compute(predictions=predictions, references=references)


def summary_stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)}


def split_metrics(predictions: list[str], references: list[str], prompt_tokens: list[int], num_gist: int,
                  kv_bytes: list[int], full_kv_bytes: list[int]) -> dict:
    scores = rouge(predictions, references)
    return {
        "n": len(references),
        "rougeL": scores["rougeL"], "rouge1": scores["rouge1"], "rouge2": scores["rouge2"],
        "exact_match": exact_match(predictions, references),
        "prompt_tokens": summary_stats(prompt_tokens),
        "compression_ratio": summary_stats([p / num_gist for p in prompt_tokens]),
        "kv_bytes_per_prompt": {"cached": statistics.fmean(kv_bytes), "full_prompt": statistics.fmean(full_kv_bytes)},
    }


def run_eval(cfg: RunConfig, zero3: bool = False) -> dict | None:
    """Evaluate the run in cfg.output_dir on every split; rank 0 writes and returns the results."""
    if dist.discover().world_size > 1 or zero3:
        dist.init(cfg.timeout_s)
    splits = eval_splits(cfg)
    records = {name: load_records(src, split="seen", n=cfg.data.num_eval, seed=cfg.data.seed + 1,
                                  bad_records=cfg.data.bad_records, role="eval",
                                  columns=cfg.data.columns) for name, src in splits.items()}
    em = load_run_model(cfg, zero3)
    template = GistTemplate(em.tok, em.gist_ids, cfg.data.max_length, "drop")
    result = {"run": str(cfg.output_dir), "mode": em.mode, "num_gist": len(em.gist_ids), "model": em.source,
              "world_size": dist.world(), "zero3": zero3, "max_new_tokens": cfg.eval_max_new_tokens,
              "batch_size": cfg.eval_batch_size, "splits": {}}
    outputs = []
    for name, recs in records.items():
        stats = DataStats()
        kept, examples = [], []
        for rec in recs:
            if template.encode(rec, stats, with_output=False) is None:  # prompt alone over max_length
                continue
            prompt, tail, _ = template.pieces(rec)
            kept.append(rec)
            examples.append({"prompt": prompt + em.gist_ids, "tail": tail, "prompt_tokens": len(prompt)})
        if not examples:
            raise DataError(f"{splits[name]}: every prompt is longer than data.max_length={cfg.data.max_length}")
        t0 = time.time()
        answers = generate_answers(em, examples, cfg.eval_batch_size, cfg.eval_max_new_tokens, synced=zero3)
        seconds = time.time() - t0
        predictions = [em.tok.decode(a["answer_ids"], skip_special_tokens=True).strip() for a in answers]
        references = [r["output"].strip() for r in kept]
        if dist.is_main():
            result["splits"][name] = {
                "source": splits[name], "dropped_overlong": stats.dropped_overlong, "generate_s": seconds,
                **split_metrics(predictions, references, [e["prompt_tokens"] for e in examples], len(em.gist_ids),
                                [a["kv_bytes"] for a in answers], [a["full_prompt_kv_bytes"] for a in answers])}
            outputs += [{"split": name, "index": i, "instruction": r["instruction"], "input": r["input"],
                         "reference": ref, "prediction": pred}
                        for i, (r, ref, pred) in enumerate(zip(kept, references, predictions))]
    if not dist.is_main():
        return None
    out = Path(cfg.output_dir)
    _write(out / "eval_outputs.jsonl", "".join(json.dumps(o) + "\n" for o in outputs))
    _write(out / "eval.md", format_markdown(result))
    _write(out / "eval.json", json.dumps(result, indent=2))
    return result


def _write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_markdown(result: dict) -> str:
    lines = [f"# Evaluation of {result['run']}", "",
             f"mode {result['mode']}, {result['num_gist']} gist token(s), model {result['model']}, "
             f"{result['world_size']} rank(s){' ZeRO-3' if result['zero3'] else ''}, greedy, "
             f"max {result['max_new_tokens']} new tokens", "",
             "| split | n | ROUGE-L | exact match | prompt tokens mean / median / max | "
             "compression mean / median / max | KV bytes/prompt cached vs full prompt |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in result["splits"].items():
        p, c, kv = s["prompt_tokens"], s["compression_ratio"], s["kv_bytes_per_prompt"]
        lines.append(f"| {name} | {s['n']} | {s['rougeL']:.4f} | {s['exact_match']:.4f} | "
                     f"{p['mean']:.1f} / {p['median']:.1f} / {p['max']} | {c['mean']:.1f} / {c['median']:.1f} / "
                     f"{c['max']:.1f} | {kv['cached']:,.0f} vs {kv['full_prompt']:,.0f} |")
    return "\n".join(lines) + "\n"


def gap_recovered(gist: float, pos: float, neg: float) -> float | None:
    """Share of the gap from the neg_control floor to the pos_control ceiling that gist recovers."""
    return (gist - neg) / (pos - neg) if pos != neg else None


def compare_runs(gist_dir, pos_dir, neg_dir, metrics=("rougeL", "exact_match")) -> dict:
    """Per split (present in all three eval.json files): each mode's score and the normalised one."""
    results = {}
    for mode, d in zip(CONTROL_MODES, (gist_dir, pos_dir, neg_dir)):
        path = Path(d) / "eval.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run gist-dist eval on {d} first)")
        results[mode] = json.loads(path.read_text())
    splits = [s for s in results["gist"]["splits"] if all(s in r["splits"] for r in results.values())]
    table = {}
    for split in splits:
        table[split] = {}
        for metric in metrics:
            score = {mode: results[mode]["splits"][split][metric] for mode in CONTROL_MODES}
            table[split][metric] = {**score, "normalised": gap_recovered(*score.values())}
    return {"runs": {mode: str(d) for mode, d in zip(CONTROL_MODES, (gist_dir, pos_dir, neg_dir))}, "splits": table}


def format_comparison(comparison: dict) -> str:
    lines = ["| split | metric | neg_control | gist | pos_control | gap recovered |", "|---|---|---:|---:|---:|---:|"]
    for split, per_metric in comparison["splits"].items():
        for metric, s in per_metric.items():
            norm = "n/a (pos = neg)" if s["normalised"] is None else f"{s['normalised']:.3f}"
            lines.append(f"| {split} | {metric} | {s['neg_control']:.4f} | {s['gist']:.4f} | "
                         f"{s['pos_control']:.4f} | {norm} |")
    return "\n".join(lines) + "\n"
