"""How much padding packing can win back: positions the padded batches compute per real token, over one
epoch of every rank's batches, for several micro-batch sizes. No training, so no timing noise; if a step
costs in proportion to the positions it computes, this is the most packing can win at equal real tokens.

    python benchmarks/padding_bound.py configs/smollm2.yaml "2 4 8 16 32 64" data.max_length=256 [key=value ...]

One process; the examples are encoded as the trainer encodes them (data.num_train records, the template,
truncation). packing_throughput.py prints the same figure for its own micro-batch.
"""

import sys

import torch

from gist_dist.config import load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.data.batches import ShardedBatches
from gist_dist.methods import METHODS, Tokens
from gist_dist.model import load_tokenizer
from gist_dist.tokens import add_gist_tokens

WORLD = 2  # ranks the batches are sharded over, as in the benchmark


def padding_bound(examples, batch_size: int, world: int, seed: int) -> float:
    """Positions the padded side computes per real token, over one epoch of its batches (every rank)."""
    positions = real = 0
    for rank in range(world):
        batches = ShardedBatches(examples, batch_size, rank, world, seed)
        for _ in range(batches.per_epoch):
            batch = next(batches)
            positions += len(batch) * max(len(e["input_ids"]) for e in batch)
            real += sum(len(e["input_ids"]) for e in batch)
    return positions / real


def main():
    config, sizes, overrides = sys.argv[1], [int(b) for b in sys.argv[2].split()], sys.argv[3:]
    cfg = load_config(config, ["objective=finetune", "data.packing=false", "data.num_train=1200", *overrides])
    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    tokens = Tokens(tok, add_gist_tokens(tok, cfg.num_gist), num_old, tok.pad_token_id)
    method = METHODS["finetune"](cfg, tokens, torch.float32)
    template = GistTemplate(tok, tokens.gist_ids, cfg.data.max_length, cfg.data.overlong, cfg.data.template)
    examples = method.encode(
        template, load_records(cfg.data.train, n=cfg.data.num_train, seed=cfg.data.seed), None, "train"
    )
    print(f"{cfg.data.train}: {len(examples)} examples, {WORLD} ranks")
    for size in sizes:
        print(
            f"  micro-batch {size:3d} examples: {padding_bound(examples, size, WORLD, cfg.train.seed):.3f} "
            "positions per real token"
        )


if __name__ == "__main__":
    main()
