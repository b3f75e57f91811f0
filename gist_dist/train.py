"""The training loop, top to bottom. Modes differ only in what trains and which loss is used.

    # one process (CPU, fp32)
    gist-dist train configs/tiny.yaml output_dir=runs/tiny
    # 2 ranks on one machine, ZeRO-3
    torchrun --nproc_per_node 2 .venv/bin/gist-dist train configs/tiny.yaml
    deepspeed --num_accelerators 2 --module gist_dist.cli train configs/tiny.yaml
    # two nodes (see launchers/ and slurm/ for mpirun, srun, sbatch)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        .venv/bin/gist-dist train configs/llama-7b.yaml

Modes: gist / pos_control / neg_control fine-tune the whole model with the matching attention
mask and the LM loss; distill freezes the backbone and trains only [k, hidden] gist embeddings by
KL(teacher with the full prompt || student with the gist tokens).
"""
from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
from pathlib import Path

import torch
import yaml
from . import artifact, checkpoint, dist
from .batches import ShardedBatches
from .config import RunConfig, to_dict
from .data import IGNORE, DataError, DataStats, GistTemplate, load_records, model_inputs, pad_batch
from .distill import GistDistiller, mean_embedding, parameter_digest
from .engine import deepspeed_config, warmup_cosine
from .metrics_log import MetricsLog, Progress, check_backends
from .gist import add_gist_tokens, init_gist_embeddings
from .model import is_shape_file, load_model, load_shape, load_tokenizer, resolve_dtype, resolve_model_path


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def param_bytes(model) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model): under ZeRO-3 a rank holds
    only its shard `ds_tensor`; the ratio proves the sharding is real."""
    held = sum(((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) + p.data.numel()) * p.element_size()
               for p in model.parameters())  # p.data is empty unless gathered or persistent
    whole = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    return held, whole


def hidden_size_of(cfg: RunConfig) -> int:
    path = resolve_model_path(cfg.model.name)
    if is_shape_file(path):
        return int(load_shape(path)["hidden_size"])
    from transformers import AutoConfig
    return int(AutoConfig.from_pretrained(path).hidden_size)


def gather_context(stage: int):
    """Context that makes ZeRO-3 partitioned params whole (and writable on rank 0)."""
    if stage != 3:
        return contextlib.nullcontext
    import deepspeed
    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)


class Batcher:
    """Turns a list of examples into model kwargs for the run's mode."""

    def __init__(self, cfg: RunConfig, gist_ids, pad_id, dtype, device):
        self.mode, self.gist_ids, self.pad_id, self.dtype = cfg.mode, gist_ids, pad_id, dtype
        self.cache_teacher = cfg.distill.cache_teacher
        self.device = device

    def pad(self, examples) -> dict:
        """Padded ids/labels, moved to the engine's device (pinned, non-blocking on GPUs); the 4D mask
        is then built there, never copied over."""
        batch = pad_batch(examples, self.pad_id)
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def __call__(self, examples):
        if self.mode == "distill":
            t = self.pad([e["teacher"] for e in examples])
            s = self.pad([e["student"] for e in examples])
            return {"teacher": model_inputs(t, self.gist_ids, "pos_control", self.dtype),
                    "student": model_inputs(s, self.gist_ids, "gist", self.dtype),
                    "labels_t": t["labels"], "labels_s": s["labels"],
                    "keys": [e["key"] for e in examples] if self.cache_teacher else None}, \
                sum(len(e["student"]["input_ids"]) for e in examples)  # counted on the host: no device sync
        b = self.pad(examples)
        return {**model_inputs(b, self.gist_ids, self.mode, self.dtype), "labels": b["labels"]}, \
            sum(len(e["input_ids"]) for e in examples)


def _keep_answer_tokens(example: dict, keep: int) -> dict:
    extra = sum(lab != IGNORE for lab in example["labels"]) - keep
    if extra <= 0:
        return example
    return {**example, "input_ids": example["input_ids"][:-extra], "labels": example["labels"][:-extra]}


def encode(cfg: RunConfig, template: GistTemplate, records, stats, split: str = "train"):
    if cfg.mode != "distill":
        return template.encode_all(records, stats)
    out = []
    for rec in records:
        teacher = template.encode(rec, stats, with_gist=False)
        student = template.encode(rec, stats, with_prompt=cfg.distill.student == "gist_mask")
        if teacher is not None and student is not None:
            # Truncation can leave the two with different answer lengths (the teacher's head holds
            # the prompt, a gist_mask student's holds prompt + gist): the KL compares the same
            # answer tokens, so both keep the shorter answer.
            keep = min(sum(lab != IGNORE for lab in e["labels"]) for e in (teacher, student))
            teacher, student = (_keep_answer_tokens(e, keep) for e in (teacher, student))
            out.append({"teacher": teacher, "student": student, "key": f"{split}:{len(out)}"})
    return out


def compute_loss(engine, mode, batch):
    if mode == "distill":
        return engine(**batch)
    return engine(**batch).loss


def run(cfg: RunConfig) -> dict:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    check_backends(cfg.log.backends)  # a missing logger fails before anything runs or is written
    env = dist.init(cfg.timeout_s)
    rank, world = env.rank, env.world_size
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.train.seed)

    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, cfg.num_gist)
    dtype = resolve_dtype(cfg.model.dtype)
    ds_config = deepspeed_config(cfg, hidden_size_of(cfg), dtype)

    # Data first: bad input fails before the model is built or anything is written.
    stats = DataStats()
    template = GistTemplate(tok, gist_ids, cfg.data.max_length, cfg.data.overlong)
    train_records = load_records(cfg.data.train, split="seen", n=cfg.data.num_train, seed=cfg.data.seed,
                                 bad_records=cfg.data.bad_records, stats=stats, columns=cfg.data.columns)
    eval_stats = DataStats()
    eval_records = load_records(cfg.data.eval, split="seen", n=cfg.data.num_eval, seed=cfg.data.seed + 1,
                                bad_records=cfg.data.bad_records, stats=eval_stats, role="eval",
                                columns=cfg.data.columns)
    train_examples = encode(cfg, template, train_records, stats)
    eval_examples = encode(cfg, template, eval_records, None, split="eval")
    if not train_examples:
        raise DataError(f"{cfg.data.train}: every record was dropped (max_length={cfg.data.max_length})")
    try:
        if cfg.mode == "distill" and cfg.distill.cache_teacher:
            # Pin each example to one rank (shuffled within it), so after one epoch every rank finds
            # all its teacher rows in its own cache; cross-rank reshuffling would keep missing.
            mine = train_examples[: len(train_examples) // world * world][rank::world]
            train_batches = ShardedBatches(mine, cfg.train.micro_batch_size, 0, 1, cfg.train.seed)
        else:
            train_batches = ShardedBatches(train_examples, cfg.train.micro_batch_size, rank, world, cfg.train.seed)
        eval_batch = max(1, min(cfg.train.micro_batch_size, len(eval_examples) // world))
        eval_batches = ShardedBatches(eval_examples, eval_batch, rank, world, 0, shuffle=False)
    except ValueError as e:
        raise DataError(f"{cfg.data.train}: {e}") from None

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # Keep the HF ZeRO-3 config alive while building: from_pretrained/from_config then use zero.Init.
    hf_ds = HfDeepSpeedConfig(ds_config) if cfg.zero.stage == 3 else None  # noqa: F841
    t_build = time.time()
    model = load_model(cfg.model, vocab_min=num_old)
    gather = gather_context(cfg.zero.stage)
    meta = {}
    if cfg.mode == "distill":
        init = mean_embedding(model, gather).expand(cfg.num_gist, -1)
        with gather([model.get_input_embeddings().weight]):
            meta["base_fingerprint"] = artifact.model_fingerprint(model.config, model.get_input_embeddings().weight)
        module = GistDistiller(model, gist_ids, init, cfg.distill.temperature, cfg.distill.lm_weight,
                               cfg.distill.cache_teacher)
        if cfg.train.verify_frozen:  # costs one gather of every weight; proves the backbone never moved
            meta["frozen_digest_before"] = parameter_digest(model.named_parameters(), gather)
        trainable = [module.gist]
    else:
        init_gist_embeddings(model, gist_ids, num_old, len(tok), gather)
        model.config.use_cache = False
        module, trainable = model, [p for p in model.parameters() if p.requires_grad]
    if cfg.train.activation_checkpointing:
        model.config.use_cache = False  # a KV cache under recompute is wasted memory
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    build_s = time.time() - t_build
    held, model_param_bytes = param_bytes(model)  # measured before deepspeed.initialize: zero.Init's doing
    rank_param_bytes = dist.all_gather_object(held)

    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    batcher = Batcher(cfg, gist_ids, tok.pad_token_id, dtype, engine.device)

    ckpt = checkpoint.Checkpointer(out / "checkpoints", cfg.train.keep_checkpoints,
                                   frozen_backbone=cfg.mode == "distill")
    start_step = ckpt.resume(engine, train_batches)
    stopper = checkpoint.StopSignal()

    n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    dist.log(f"gist-dist: mode={cfg.mode} k={cfg.num_gist} ranks={world} ({env.source}) zero={cfg.zero.stage} "
             f"dtype={dtype} trainable={n_trainable:,} train={len(train_examples)} data={stats.as_dict()}")
    dist.log(f"gist-dist: train records: {stats.records} used of {stats.source_records} in {cfg.data.train}"
             + (f" (data.num_train={cfg.data.num_train})" if stats.records < stats.source_records else "")
             + f"; eval records: {eval_stats.records} used of {eval_stats.source_records} in {cfg.data.eval}")
    metrics = MetricsLog(cfg, main=rank == 0, fresh=start_step == 0)
    log_metrics = metrics.record

    def evaluate_loss():
        engine.eval()
        eval_batches.epoch = eval_batches.index = 0
        total = count = 0.0
        with torch.no_grad():
            for _ in range(min(cfg.train.eval_batches, eval_batches.per_epoch)):
                batch, _ = batcher(next(eval_batches))
                total += float(compute_loss(engine, cfg.mode, batch))
                count += 1
        engine.train()
        total, count = dist.all_reduce([total, count])
        return total / max(count, 1)

    if start_step == 0:
        eval_before = evaluate_loss()  # the baseline the run is judged against
        log_metrics({"event": "start", "world_size": world, "mode": cfg.mode, "num_gist": cfg.num_gist,
                     "eval_loss_before": eval_before, "trainable_params": n_trainable, "build_s": build_s, "data": stats.as_dict(),
                     "eval_data": eval_stats.as_dict(),
                     "rank_param_bytes": rank_param_bytes, "model_param_bytes": model_param_bytes,
                     "launcher": env.source, "optimizer_state_bytes": 2 * 4 * n_trainable})

    first_loss = last_loss = None
    step = start_step
    progress = Progress(cfg.train.max_steps, start_step, cfg.train.log_every, rank == 0, f"train[{cfg.mode}]",
                        cfg.log.progress)
    while step < cfg.train.max_steps:
        t0 = time.time()
        loss_sum, tokens = 0.0, 0
        for _ in range(cfg.train.grad_accum):
            batch, n_tok = batcher(next(train_batches))
            loss = compute_loss(engine, cfg.mode, batch)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            tokens += n_tok
        step += 1
        step_time = time.time() - t0
        loss_mean, total_tokens = dist.all_reduce([loss_sum / cfg.train.grad_accum / world, tokens])
        per_rank = dist.all_gather_object((tokens / step_time, peak_memory_gb()))  # one collective per step
        rank_tps, rank_mem = [r[0] for r in per_rank], [r[1] for r in per_rank]
        record = {"step": step, "loss": loss_mean, "lr": scheduler.get_last_lr()[0], "step_time_s": step_time,
                  "tokens": int(total_tokens), "tokens_per_s": sum(rank_tps), "rank_tokens_per_s": rank_tps,
                  "peak_mem_gb": max(rank_mem), "rank_peak_mem_gb": rank_mem}
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            record["eval_loss"] = evaluate_loss()
        log_metrics(record)
        first_loss = loss_mean if first_loss is None else first_loss
        last_loss = loss_mean
        progress.update(step, loss_mean, record["tokens_per_s"], step_time)
        stop = stopper.agreed()
        if stop or (cfg.train.save_every and step % cfg.train.save_every == 0):
            tag = ckpt.save(engine, train_batches, step)
        if stop:
            # The launcher's cue to requeue when its own exit status cannot carry 75 (torchrun exits 1).
            log_metrics({"event": "stop", "after_step": step, "checkpoint": tag})
            dist.log(f"gist-dist: stop signal received, checkpoint saved at step {step}; exiting for requeue")
            metrics.close()
            raise SystemExit(checkpoint.REQUEUE_EXIT_CODE)
    progress.close()
    ckpt.save(engine, train_batches, step)
    if cfg.mode == "distill" and cfg.train.verify_frozen:
        meta["frozen_digest_after"] = parameter_digest(module.model.named_parameters(), gather_context(cfg.zero.stage))
        if meta["frozen_digest_after"] != meta.get("frozen_digest_before", meta["frozen_digest_after"]):
            raise RuntimeError("distill: a frozen backbone weight changed during training")
    export(cfg, engine, module, tok, out, meta, last_loss)
    cache = getattr(module, "teacher_cache", None)
    log_metrics({"event": "end", "steps": step, "last_loss": last_loss,
                 "teacher_cache": cache and {"hits": cache.hits, "misses": cache.misses},
                 **{k: v for k, v in meta.items() if k.startswith("frozen_digest")}})
    metrics.close()
    dist.barrier()
    summary = {"first_loss": first_loss, "last_loss": last_loss, "steps": step, "output_dir": str(out)}
    return summary


def export(cfg: RunConfig, engine, module, tok, out: Path, meta: dict, last_loss):
    """gist modes: OUTPUT_DIR/final/ (safetensors + tokenizer). distill: the gist artifact."""
    if cfg.mode == "distill":
        with gather_context(cfg.zero.stage)([module.gist]):
            gist = module.gist.detach().clone()
        if dist.is_main():
            artifact.save(out, gist, {
                **meta, "base_model": cfg.model.name, "num_gist": cfg.num_gist,
                "gist_tokens": tok.convert_ids_to_tokens(list(module.gist_ids.tolist())),
                "hidden_size": gist.shape[1], "tokenizer": cfg.model.tokenizer or cfg.model.name,
                "mode": "distill", "final_loss": last_loss, "temperature": cfg.distill.temperature,
                "student": cfg.distill.student})
        return
    if cfg.zero.stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathered on rank 0 only
    else:
        state = module.state_dict()
    if dist.is_main():
        final = out / "final"
        tmp = out / "final.tmp"
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        gist_tokens = tok.convert_ids_to_tokens(tok.convert_tokens_to_ids([f"<GIST_{i}>" for i in range(cfg.num_gist)]))
        (tmp / "gist_config.json").write_text(json.dumps(
            {"mode": cfg.mode, "num_gist": cfg.num_gist, "gist_tokens": gist_tokens}, indent=2))
        (tmp / "README.md").write_text(model_card(cfg, gist_tokens))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def model_card(cfg: RunConfig, gist_tokens: list[str]) -> str:
    """final/README.md: what the gist tokens are and how to use the cached path with transformers alone."""
    gist = "".join(gist_tokens)
    keep = {"gist": f"Keep only the last {cfg.num_gist} entries of every layer's keys/values (the gist tokens)",
            "pos_control": "Keep every entry (pos_control masks nothing: the control, not a compressed model)",
            "neg_control": "Keep no entry (neg_control hides the prompt and the gist: the floor control)"}[cfg.mode]
    return f"""# Gist model ({cfg.mode}, {cfg.num_gist} gist token(s))

Trained by gist-dist from `{cfg.model.name}`. The tokenizer has the gist tokens `{gist}` as special tokens.

Template (labels only on the output):

    Instruction: {{instruction}}\\n{gist}\\nInput: {{input}}\\nOutput: {{output}}<eos>

(`\\nInput: {{input}}` is left out when there is no input.) Under the `{cfg.mode}` mask, tokens after the
gist cannot see the instruction, so only the gist tokens' keys/values need to be kept.

Cached path with transformers alone:
1. Run `Instruction: ...\\n{gist}` once with `use_cache=True`, positions 0..n-1.
2. {keep}; put them in a `DynamicCache`.
3. Generate from `\\nInput: ...\\nOutput:` with that cache, `attention_mask` of ones over
   gist + new tokens, and `position_ids` starting at n (where the instruction + gist ended).
The answers equal those of the full sequence under the gist mask (`gist-dist eval` checks this path).
"""
