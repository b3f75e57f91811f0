"""The model cache is filled by whichever rank takes its lock first: under a real 2-rank gloo group,
rank 1 materializes the shapes (LLaMA and T5) while rank 0 waits, then both load the same weights."""

import textwrap

from conftest import BIN, ROOT, free_port, run

SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from gist_dist.model import auto_class, config_from_shape, materialize_shape
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for shape in sys.argv[1:]:
        config = config_from_shape(shape)
        if rank == 1:  # transformers' save_pretrained would write nothing here
            materialize_shape(config, seed=3)
        dist.barrier()
        folder = materialize_shape(config, seed=3)  # rank 0 finds it, does not rewrite it
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists(), sorted(folder.iterdir())
        loaded = auto_class(config).from_pretrained(folder, dtype=torch.float32).state_dict()
        torch.manual_seed(3)
        fresh = auto_class(config).from_config(config, dtype=torch.float32).state_dict()
        assert loaded.keys() == fresh.keys()
        assert all(torch.equal(loaded[k], fresh[k]) for k in fresh), shape
        digest = torch.tensor([float(sum(v.double().sum() for v in loaded.values()))])
        both = [torch.zeros(1), torch.zeros(1)]
        dist.all_gather(both, digest)
        assert torch.equal(both[0], both[1])
    print("ok", rank)
    dist.barrier()
    dist.destroy_process_group()  # see gist_dist.dist.shutdown: exiting with a live gloo group can abort
""")


def test_rank_one_fills_the_shape_cache(tmp_path):
    script = tmp_path / "fill.py"
    script.write_text(SCRIPT)
    shapes = [ROOT / "configs" / "models" / "tiny.yaml", ROOT / "configs" / "models" / "t5-tiny.yaml"]
    proc = run(
        [
            BIN / "torchrun",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            script,
            *shapes,
        ],
        env={"GIST_DIST_CACHE": str(tmp_path / "cache")},
    )
    assert proc.stdout.count("ok") == 2
