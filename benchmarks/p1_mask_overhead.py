"""P1: step time of gist-masked training vs plain causal-LM training, same engine/model/batch/ranks.

    torchrun --nproc_per_node 2 benchmarks/p1_mask_overhead.py configs/smollm2.yaml \
        data.train=../shared/data/alpaca_train.json [key=value ...]

One ZeRO-3 engine; steps alternate between the 4D float gist mask and the model's default 2D
padding mask on the same token batches, so machine noise hits both sides alike. Prints the
ratio of medians (target <= 1.05).
"""
import statistics
import sys
import time

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from gist_dist import dist
from gist_dist.config import load_config
from gist_dist.data import GistTemplate, load_records, model_inputs, pad_batch
from gist_dist.engine import deepspeed_config
from gist_dist.gist import add_gist_tokens, init_gist_embeddings
from gist_dist.model import load_model, load_tokenizer, resolve_dtype
from gist_dist.train import gather_context, hidden_size_of

REPEATS, WARMUP = 8, 2


def main():
    args = sys.argv[1:] or ["configs/smollm2.yaml"]
    cfg = load_config(args[0], ["data.max_length=128", *args[1:]])
    env = dist.init(cfg.timeout_s)
    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, cfg.num_gist)
    dtype = resolve_dtype(cfg.model.dtype)
    ds_config = deepspeed_config(cfg, hidden_size_of(cfg), dtype)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (build under zero.Init)
    model = load_model(cfg.model, vocab_min=num_old)
    init_gist_embeddings(model, gist_ids, num_old, len(tok), gather_context(3))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5))
    template = GistTemplate(tok, gist_ids, cfg.data.max_length)
    # Both variants run on the very same batches (up to micro_batch x max_length tokens per rank).
    examples = template.encode_all(load_records(cfg.data.train, n=400, seed=env.rank))[env.rank::env.world_size]
    b = cfg.train.micro_batch_size
    times = {"gist_4d": [], "plain_2d": []}
    for i in range(WARMUP + REPEATS):
        batch = pad_batch(examples[i * b:(i + 1) * b], tok.pad_token_id)
        for variant in (("gist_4d", "plain_2d") if i % 2 == 0 else ("plain_2d", "gist_4d")):
            if variant == "gist_4d":
                kwargs = model_inputs(batch, gist_ids, "gist", dtype)
            else:
                kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            dist.barrier()
            t0 = time.perf_counter()
            loss = engine(**kwargs, labels=batch["labels"]).loss
            engine.backward(loss)
            engine.step()
            dist.barrier()
            if i >= WARMUP:
                times[variant].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    dist.log(f"P1 world={env.world_size} batch={b}x<= {cfg.data.max_length} tokens per rank, {REPEATS} steps each")
    for k, v in times.items():
        dist.log(f"  {k:9s} median {med[k]:.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    dist.log(f"  ratio gist_4d / plain_2d = {med['gist_4d'] / med['plain_2d']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
