"""Packed vs padded training throughput: real (non-padding) tokens per second, one Trainer, alternating.

    torchrun --nproc_per_node 2 benchmarks/packing_throughput.py configs/smollm2.yaml \
        data.train=../shared/data/alpaca_train.json [key=value ...]

One ZeRO-3 engine (gist mask, fine-tune). Each round runs `Trainer.train_step()` once on padded
micro-batches (train.micro_batch_size examples, each padded to the longest) and once on packed
rows (rows of up to data.max_length tokens), in alternating order. The packed micro-batch holds
as many rows as give about the same real tokens per step as the padded one. Prints real tokens/s
of both (median over rounds), the real tokens per step of both (set train.micro_batch_size so
they match: the packed side rounds to whole rows) and the ratio packed / padded
(targets: >= 1.5x Alpaca, >= 2x generated).
"""

import statistics
import sys
import time

from padding_bound import padding_bound  # this folder's script: the same bound, no training

from gist_dist import dist
from gist_dist.config import load_config
from gist_dist.data.batches import ShardedBatches
from gist_dist.trainer import Trainer

ROUNDS, WARMUP = 8, 2


def real_tokens(rows) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def main():
    args = sys.argv[1:] or ["configs/smollm2.yaml"]
    cfg = load_config(
        args[0],
        [
            "output_dir=runs/packing_bench",
            "objective=finetune",
            "mask=gist",
            "data.packing=false",
            "data.num_train=1200",
            *args[1:],
        ],
    )
    trainer = Trainer(cfg)
    examples = trainer.train_examples
    packed = trainer.method.pack(examples, cfg.data.max_length)
    per_example = real_tokens(examples) / len(examples)
    per_row = real_tokens(packed) / len(packed)
    rows_per_batch = max(1, round(cfg.train.micro_batch_size * per_example / per_row))
    rank, world = dist.rank(), dist.world()
    loaders = {
        "padded": trainer.train_batches,
        "packed": ShardedBatches(packed, rows_per_batch, rank, world, cfg.train.seed),
    }
    tps = {name: [] for name in loaders}
    step_tokens = {name: [] for name in loaders}
    for i in range(WARMUP + ROUNDS):
        for name in ("padded", "packed") if i % 2 == 0 else ("packed", "padded"):
            trainer.train_batches = loaders[name]
            dist.barrier()
            t0 = time.perf_counter()
            record = trainer.train_step()
            dist.barrier()
            if i >= WARMUP:
                tps[name].append(record["tokens"] / (time.perf_counter() - t0))  # tokens = real ids, all ranks
                step_tokens[name].append(record["tokens"])
    med = {k: statistics.median(v) for k, v in tps.items()}
    dist.log(
        f"packing world={world}: {len(examples)} examples ({per_example:.1f} tokens each) -> {len(packed)} rows "
        f"({per_row:.1f} tokens each, capacity {cfg.data.max_length}); micro-batch {cfg.train.micro_batch_size} "
        f"examples vs {rows_per_batch} rows, {ROUNDS} steps each"
    )
    bound = padding_bound(examples, cfg.train.micro_batch_size, world, cfg.train.seed)
    dist.log(
        f"  padding bound: the padded batches compute {bound:.2f} positions per real token "
        "(the most packing can win at equal real tokens)"
    )
    for k, v in tps.items():
        dist.log(
            f"  {k:6s} real tokens/s median {med[k]:.1f}  (min {min(v):.1f}, max {max(v):.1f}); "
            f"real tokens per step (all ranks) median {statistics.median(step_tokens[k]):.0f}"
        )
    dist.log(f"  ratio packed / padded = {med['packed'] / med['padded']:.2f}")


if __name__ == "__main__":
    main()
