"""The Trainer: build once, then `train_step()` until done; the method decides what trains and how.

    # one process (CPU, fp32)
    gist-dist train configs/tiny.yaml output_dir=runs/tiny
    # 2 ranks on one machine, ZeRO-3
    torchrun --nproc_per_node 2 .venv/bin/gist-dist train configs/tiny.yaml
    deepspeed --num_accelerators 2 --module gist_dist.cli train configs/tiny.yaml
    # two nodes (see launchers/ and slurm/ for mpirun, srun, sbatch)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        .venv/bin/gist-dist train configs/llama-7b.yaml

From Python (benchmarks and tests drive the step directly):
    trainer = Trainer(load_config("configs/tiny.yaml", ["output_dir=runs/x"]))
    record = trainer.train_step()      # one optimizer step (all micro-batches of it), metrics all-reduced
    summary = trainer.train()          # the rest: eval, checkpoints, preemption, export
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from pathlib import Path

import torch
import yaml

from . import dist, preempt, zero
from .checkpoint import Checkpointer
from .config import ConfigError, RunConfig, to_dict
from .data import DataError, DataStats, GistTemplate, load_records
from .data.batches import ShardedBatches
from .methods import Tokens, method_for
from .metrics_log import MetricsLog, Progress, check_backends
from .model import load_model, load_tokenizer, resolve_dtype
from .tokens import add_gist_tokens


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def attention_backend(choice: str, flex_ok: bool = True) -> str:
    """auto: FlexAttention's BlockMask on CUDA (where the method can take one), the dense 4D mask
    elsewhere (flex has no CPU backward)."""
    if choice == "auto":
        return "flex" if torch.cuda.is_available() and flex_ok else "dense"
    if choice == "flex" and not torch.cuda.is_available():
        raise ConfigError(
            "model.attention=flex trains only on CUDA (FlexAttention has no CPU backward here); use dense or auto"
        )
    return choice


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to min_ratio."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def follow_schedule(scheduler, base_lrs: list[float], step: int):
    """After a resume, the next update's lr comes from this run's schedule. The loaded optimizer
    holds the lr the saving run had set for it, and the scheduler its base lrs: both differ from
    this run's when it changed max_steps, lr or warm-up (a run extended), for the first update."""
    scheduler.base_lrs = list(base_lrs)
    lrs = [base * factor(step) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


class Trainer:
    def __init__(self, cfg: RunConfig):
        import deepspeed

        check_backends(cfg.log.backends)  # a missing logger fails before anything runs or is written
        self.cfg, self.env = cfg, dist.init(cfg.timeout_s)
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model)
        num_old = len(tok)
        self.tokens = Tokens(tok, add_gist_tokens(tok, cfg.num_gist), num_old, tok.pad_token_id)
        self.dtype = resolve_dtype(cfg.model.dtype)
        method = method_for(cfg)  # by (model family, objective): checked before anything is built
        self.attention = attention_backend(cfg.model.attention, method.flex_attention)
        self.method = method(cfg, self.tokens, self.dtype, self.attention)
        ds_config = zero.deepspeed_config(cfg, zero.hidden_size_of(cfg), self.dtype)
        zero.build_nvme_op(cfg, say=dist.log)  # before anything is written: it can refuse, and it takes minutes once

        self._load_data()  # bad input fails before the model is built or anything is written
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

        t_build = time.time()
        model_cfg = (
            cfg.model
            if self.attention == "dense"
            else dataclasses.replace(cfg.model, attn_implementation="flex_attention")
        )
        with zero.build_context(ds_config):  # resizing the vocabulary (wrap) needs it alive too
            model = load_model(model_cfg, vocab_min=num_old)
            self.module, trainable = self.method.wrap(model)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.build_s = time.time() - t_build
        held, self.model_param_bytes = zero.param_bytes(model)  # before deepspeed.initialize: zero.Init's doing
        self.rank_param_bytes = dist.all_gather_object(held)
        self.n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)

        # fused: one kernel over each flat ZeRO partition instead of foreach's per-tensor ops, on CPU and CUDA
        # alike (docs/results.md, step profile)
        groups = self.method.param_groups(self.module, trainable)  # train.gist_lr: the gist rows have their own
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio)
        )
        base_lrs = list(scheduler.base_lrs)  # this run's; a resume loads the checkpoint's
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.checkpoints = Checkpointer(
            self.out / "checkpoints", cfg.train.keep_checkpoints, frozen_backbone=not self.method.trains_backbone
        )
        self.step = self.start_step = self.checkpoints.resume(self.engine, self.train_batches)
        if self.start_step:
            follow_schedule(scheduler, base_lrs, self.start_step)
        self.meta = self.method.start(self.module)
        self.stopper = preempt.StopSignal()
        self.metrics = MetricsLog(cfg, main=dist.is_main(), fresh=self.start_step == 0)

    def _load_data(self):
        cfg, rank, world = self.cfg, self.env.rank, self.env.world_size
        self.stats, self.eval_stats = DataStats(), DataStats()
        template = GistTemplate(
            self.tokens.tokenizer, self.tokens.gist_ids, cfg.data.max_length, cfg.data.overlong, cfg.data.template
        )
        common = {"split": "seen", "bad_records": cfg.data.bad_records, "columns": cfg.data.columns}
        train = load_records(cfg.data.train, n=cfg.data.num_train, seed=cfg.data.seed, stats=self.stats, **common)
        evals = load_records(
            cfg.data.eval, n=cfg.data.num_eval, seed=cfg.data.seed + 1, stats=self.eval_stats, role="eval", **common
        )
        self.train_examples = self.method.encode(template, train, self.stats, "train")
        eval_examples = self.method.encode(template, evals, None, "eval")
        if not self.train_examples:
            raise DataError(f"{cfg.data.train}: every record was dropped (max_length={cfg.data.max_length})")
        if cfg.data.packing:  # rows of several examples; eval batches too (the loss is per token either way)
            n = len(self.train_examples)
            self.train_examples = self.method.pack(self.train_examples, cfg.data.max_length)
            eval_examples = self.method.pack(eval_examples, cfg.data.max_length)
            dist.log(
                f"gist-dist: packed {n} examples into {len(self.train_examples)} rows of <= "
                f"{cfg.data.max_length} tokens"
            )
        try:
            self.train_batches = self.method.batches(
                self.train_examples, cfg.train.micro_batch_size, rank, world, cfg.train.seed
            )
            eval_batch = max(1, min(cfg.train.micro_batch_size, len(eval_examples) // world))
            self.eval_batches = ShardedBatches(eval_examples, eval_batch, rank, world, 0, shuffle=False)
        except ValueError as e:
            raise DataError(f"{cfg.data.train}: {e}") from None

    def _log_start(self):
        cfg, env, s, e = self.cfg, self.env, self.stats, self.eval_stats
        dist.log(
            f"gist-dist: objective={cfg.objective} mask={cfg.mask} k={cfg.num_gist} ranks={env.world_size} "
            f"({env.source}) zero={cfg.zero.stage} dtype={self.dtype} trainable={self.n_trainable:,} "
            f"train={len(self.train_examples)} data={s.as_dict()}"
        )
        dist.log(
            f"gist-dist: train records: {s.records} used of {s.source_records} in {cfg.data.train}"
            + (f" (data.num_train={cfg.data.num_train})" if s.records < s.source_records else "")
            + f"; eval records: {e.records} used of {e.source_records} in {cfg.data.eval}"
        )
        if self.start_step == 0:
            self.metrics.record(
                {
                    "event": "start",
                    "world_size": env.world_size,
                    "objective": cfg.objective,
                    "mask": cfg.mask,
                    "num_gist": cfg.num_gist,
                    "eval_loss_before": self.evaluate(),
                    "trainable_params": self.n_trainable,
                    "build_s": self.build_s,
                    "data": s.as_dict(),
                    "eval_data": e.as_dict(),
                    "rank_param_bytes": self.rank_param_bytes,
                    "model_param_bytes": self.model_param_bytes,
                    "launcher": env.source,
                    "optimizer_state_bytes": 2 * 4 * self.n_trainable,
                }
            )

    def evaluate(self) -> float:
        """Loss per target token over train.eval_batches held-out batches of every rank."""
        self.engine.eval()
        self.eval_batches.rewind()
        total = targets = 0.0
        with torch.no_grad():
            for _ in range(min(self.cfg.train.eval_batches, self.eval_batches.per_epoch)):
                examples = next(self.eval_batches)
                batch, _ = self.method.collate(examples, self.engine.device)
                total += float(self.engine(**batch))
                targets += self.method.targets(examples)
        self.engine.train()
        total, targets = dist.all_reduce([total, targets])
        return total / max(targets, 1)

    def train_step(self) -> dict:
        """One optimizer step over train.grad_accum micro-batches; the metrics record of the step.

        Loss rule: the mean over the target tokens of the whole global batch (every micro-batch of
        every rank), whatever their grouping: each micro-batch's summed loss is scaled by
        world * grad_accum / (global target tokens), which DeepSpeed's 1/grad_accum and its
        average over ranks turn back into exactly 1 / (global target tokens)."""
        t0 = time.time()
        accum, world = self.cfg.train.grad_accum, self.env.world_size
        micro = [next(self.train_batches) for _ in range(accum)]  # host lists only: counted before any forward
        targets = dist.all_reduce([float(sum(self.method.targets(m) for m in micro))])[0]
        scale = world * accum / max(targets, 1.0)
        loss_sum, tokens = 0.0, 0
        for examples in micro:
            batch, n_tok = self.method.collate(examples, self.engine.device)
            summed = self.engine(**batch)
            self.engine.backward(summed * scale)
            self.engine.step()
            loss_sum += float(summed.detach())
            tokens += n_tok
        self.step += 1
        step_time = time.time() - t0
        grad_norm = self.engine.get_global_grad_norm()  # of the step's gradient, before clipping
        loss_sum, total_tokens = dist.all_reduce([loss_sum, tokens])
        loss_mean = loss_sum / max(targets, 1.0)
        per_rank = dist.all_gather_object((tokens / step_time, peak_memory_gb()))  # one collective per step
        rank_tps, rank_mem = [r[0] for r in per_rank], [r[1] for r in per_rank]
        lrs = self.scheduler.get_last_lr()  # a second group: the gist rows (train.gist_lr)
        return {
            "step": self.step,
            "loss": loss_mean,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "lr": lrs[0],
            **({"gist_lr": lrs[1]} if len(lrs) > 1 else {}),
            "step_time_s": step_time,
            "tokens": int(total_tokens),
            "tokens_per_s": sum(rank_tps),
            "rank_tokens_per_s": rank_tps,
            "peak_mem_gb": max(rank_mem),
            "rank_peak_mem_gb": rank_mem,
        }

    def train(self) -> dict:
        """Steps to train.max_steps with eval, checkpoints and preemption; then export and the end record."""
        cfg = self.cfg.train
        self._log_start()
        first_loss = last_loss = None
        progress = Progress(
            cfg.max_steps,
            self.start_step,
            cfg.log_every,
            dist.is_main(),
            f"train[{self.cfg.run_kind}]",
            self.cfg.log.progress,
        )
        while self.step < cfg.max_steps:
            record = self.train_step()
            if cfg.eval_every and self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                record["eval_loss"] = self.evaluate()
            self.metrics.record(record)
            first_loss = record["loss"] if first_loss is None else first_loss
            last_loss = record["loss"]
            progress.update(self.step, last_loss, record["tokens_per_s"], record["step_time_s"])
            stop = self.stopper.agreed()
            if stop or (cfg.save_every and self.step % cfg.save_every == 0):
                tag = self.checkpoints.save(self.engine, self.train_batches, self.step)
            if stop:
                self._exit_for_requeue(tag)
        progress.close()
        self.checkpoints.save(self.engine, self.train_batches, self.step)
        end = self.method.finish(self.module, self.meta)
        self.method.export(self.engine, self.module, self.out, self.meta, last_loss)
        self.metrics.record({"event": "end", "steps": self.step, "last_loss": last_loss, **end})
        self.metrics.close()
        dist.barrier()
        return {"first_loss": first_loss, "last_loss": last_loss, "steps": self.step, "output_dir": str(self.out)}

    def _exit_for_requeue(self, tag: str):
        # The stop record is the launcher's cue to requeue when its own exit status cannot carry 75
        # (torchrun exits 1).
        self.metrics.record({"event": "stop", "after_step": self.step, "checkpoint": tag})
        dist.log(f"gist-dist: stop signal received, checkpoint saved at step {self.step}; exiting for requeue")
        self.metrics.close()
        raise SystemExit(preempt.REQUEUE_EXIT_CODE)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward: non-reentrant, so it works for distill too, where the
    only tensor that needs a gradient enters at the input."""
    model.config.use_cache = False  # a KV cache under recompute is wasted memory
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def run(cfg: RunConfig) -> dict:
    return Trainer(cfg).train()
