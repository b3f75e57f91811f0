"""P1: step time of gist-masked training vs plain causal-LM training, same engine/model/batch/ranks.

    torchrun --nproc_per_node 2 benchmarks/p1_mask_overhead.py configs/smollm2.yaml \
        data.train=../shared/data/alpaca_train.json [key=value ...]

One Trainer (ZeRO-3 engine); each round runs `Trainer.train_step()` twice on the same batches (the
loader position is restored in between), once with the method's 4D float gist mask and once with
the model's default 2D padding mask, in alternating order, so machine noise hits both sides alike.
Prints the ratio of medians (target <= 1.05).
"""

import statistics
import sys
import time

from gist_dist import dist
from gist_dist.config import load_config
from gist_dist.methods.base import to_device
from gist_dist.trainer import Trainer

REPEATS, WARMUP = 8, 2


def main():
    args = sys.argv[1:] or ["configs/smollm2.yaml"]
    cfg = load_config(
        args[0],
        [
            "data.max_length=128",
            "data.packing=false",
            "train.micro_batch_size=4",  # as recorded
            "output_dir=runs/p1",
            "objective=finetune",
            "mask=gist",
            "data.num_train=400",
            *args[1:],
        ],
    )
    trainer = Trainer(cfg)
    gist_collate = trainer.method.collate

    def plain_collate(examples, device):  # what a plain causal-LM trainer feeds the model
        b = to_device(examples, trainer.tokens.pad_id, device)
        return {
            "input_ids": b["input_ids"],
            "attention_mask": b["attention_mask"],
            "position_ids": None,
            "labels": b["labels"],
        }, sum(len(e["input_ids"]) for e in examples)

    variants = {"gist_4d": gist_collate, "plain_2d": plain_collate}
    times = {name: [] for name in variants}
    for i in range(WARMUP + REPEATS):
        position = trainer.train_batches.state_dict()
        for name in ("gist_4d", "plain_2d") if i % 2 == 0 else ("plain_2d", "gist_4d"):
            trainer.train_batches.load_state_dict(position)  # both variants see the very same batches
            trainer.method.collate = variants[name]
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step()
            dist.barrier()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    dist.log(
        f"P1 world={dist.world()} batch={cfg.train.micro_batch_size}x<= {cfg.data.max_length} tokens per rank, "
        f"{REPEATS} steps each"
    )
    for k, v in times.items():
        dist.log(f"  {k:9s} median {med[k]:.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    dist.log(f"  ratio gist_4d / plain_2d = {med['gist_4d'] / med['plain_2d']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
