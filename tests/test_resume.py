"""Resume: bit-exact on the same world size, DeepSpeed universal checkpoint on another one.

Real 2-rank ZeRO-3 runs of the tiny config (every parameter partitioned). A checkpoint taken in
the middle of an uninterrupted run is copied to a fresh output dir and resumed there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, free_port, gist_dist, torchrun
from gist_dist import artifact

STEPS, SAVE_EVERY = 8, 4
ARGS = [f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}"]


def losses(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def one_rank(args: list[str], **kw):
    """A single process (world size 1), on its own port."""
    return gist_dist(args, env={"MASTER_PORT": str(free_port())}, **kw)


def fresh_dir_resuming_from(run: Path, tag: str, target: Path) -> Path:
    """A new output dir whose only checkpoint is `tag` of `run`, published as latest."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / tag, target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(tag)
    return target


def resume_at_the_checkpoint_is_exact(run: Path, tag: str, out: Path, args: list[str], tensors: tuple[str, ...]):
    """Resume a copy of `run` from its checkpoint `tag` with the same `args`: every later step's loss equals
    the uninterrupted run's, and the artifact's `tensors` are equal bit for bit."""
    fresh_dir_resuming_from(run, tag, out)
    torchrun(["train", TINY, f"output_dir={out}", *args])
    reference, resumed = losses(run), losses(out)
    steps = [r for r in reference if r > int(tag.removeprefix("step"))]
    assert steps and sorted(resumed) == steps and resumed == {s: reference[s] for s in resumed}
    for name in tensors:
        assert torch.equal(load_file(out / artifact.WEIGHTS)[name], load_file(run / artifact.WEIGHTS)[name])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    torchrun(["train", TINY, f"output_dir={out}", *ARGS])
    return out


def test_checkpoint_holds_everything_and_loads_weights_only(uninterrupted):
    ckpt = uninterrupted / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{STEPS:08d}"
    folder = ckpt / f"step{SAVE_EVERY:08d}"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == SAVE_EVERY and state["world_size"] == 2
    assert state["loader"]["index"] == SAVE_EVERY  # one micro-batch per step per rank
    for rank in (0, 1):
        assert set(json.loads((folder / f"rng_rank{rank}.json").read_text())) >= {"python", "numpy", "torch"}
        for kind in ("model", "optim"):
            assert (folder / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt").is_file()
    # Every file DeepSpeed reads back loads with weights_only=True (plus DeepSpeed's 2 plain classes).
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
        for f in folder.glob("*.pt"):
            torch.load(f, weights_only=True)
    model = torch.load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert "lr_scheduler" in model and model["lr_scheduler"]["last_epoch"] == SAVE_EVERY


def test_resume_is_bit_exact(uninterrupted, tmp_path):
    out = fresh_dir_resuming_from(uninterrupted, f"step{SAVE_EVERY:08d}", tmp_path / "resumed")
    proc = torchrun(["train", TINY, f"output_dir={out}", *ARGS])
    assert f"resumed from {out / 'checkpoints' / f'step{SAVE_EVERY:08d}'} at step {SAVE_EVERY}" in proc.stdout
    reference, resumed = losses(uninterrupted), losses(out)
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert resumed == {s: reference[s] for s in resumed}  # exact float equality
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line][-1]
    ref_final = [
        json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines() if '"step"' in line
    ][-1]
    assert final["eval_loss"] == ref_final["eval_loss"]


def test_resume_on_one_rank_through_universal_checkpoint(uninterrupted, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = f"step{SAVE_EVERY:08d}"
    out = fresh_dir_resuming_from(uninterrupted, tag, tmp_path / "one_rank")
    # max_steps = the saved step: nothing trains, the export holds exactly the loaded weights.
    proc = one_rank(["train", TINY, f"output_dir={out}", f"train.max_steps={SAVE_EVERY}"])
    assert "saved by 2 ranks, now 1" in proc.stdout
    assert (out / "checkpoints" / tag / "universal").is_dir()
    saved = get_fp32_state_dict_from_zero_checkpoint(str(uninterrupted / "checkpoints"), tag=tag)
    saved = {k.removeprefix("model."): v for k, v in saved.items()}  # the engine trains the loss wrapper
    loaded = load_file(out / "final" / "model.safetensors")
    assert loaded and set(loaded) <= set(saved)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, saved[name]), name
    # And training goes on from there at the new world size (optimizer + scheduler restored).
    one_rank(["train", TINY, f"output_dir={out}", *ARGS])
    continued = losses(out)
    assert sorted(continued) == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in continued.values())


def test_other_world_size_without_usable_shards_fails_clearly(uninterrupted, tmp_path):
    tag = f"step{SAVE_EVERY:08d}"
    out = fresh_dir_resuming_from(uninterrupted, tag, tmp_path / "broken")
    for f in (out / "checkpoints" / tag).glob("*optim_states.pt"):
        f.unlink()
    proc = one_rank(["train", TINY, f"output_dir={out}", *ARGS], check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gist-dist: error:")]
    assert len(lines) == 1 and "saved by 2 ranks, resuming with 1" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()


def test_prune_keeps_newest_n_and_never_the_published_one(tmp_path):
    from gist_dist.checkpoint import STATE_FILE, Checkpointer, CheckpointError

    def complete(tag):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / STATE_FILE).write_text("{}")

    for step in (2, 4, 6, 10):
        complete(f"step{step:08d}")
    (tmp_path / "tmp-step00000012").mkdir()  # a crashed save
    (tmp_path / "latest").write_text("step00000004")
    Checkpointer(tmp_path, keep=1)._prune("step00000004")  # published one is older than step 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000004", "step00000010"]
    Checkpointer(tmp_path, keep=2)._prune("step00000010")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000004", "step00000010"]
    # A pointer to something incomplete is an error, not a silent fresh start.
    (tmp_path / "latest").write_text("step00000006")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Checkpointer(tmp_path, keep=2).latest_tag()


def test_distill_checkpoints_leave_out_the_frozen_backbone_and_resume(tmp_path):
    """Packed distill (teacher and student rows packed alike): it saves only what trains (the gist
    embeddings + their optimizer state); the frozen backbone comes back from the base model, so
    resuming still reproduces every loss exactly."""
    args = [
        "objective=distill",
        "num_gist=2",
        f"train.max_steps={STEPS}",
        f"train.save_every={SAVE_EVERY}",
        "data.packing=true",
        "train.lr=0.01",
    ]
    full = tmp_path / "full"
    proc = torchrun(["train", TINY, f"output_dir={full}", *args])
    assert "gist-dist: packed 512 examples into" in proc.stdout
    log = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert log[-2]["eval_loss"] < log[0]["eval_loss_before"]  # the KL to the teacher falls
    tag = f"step{SAVE_EVERY:08d}"
    folder = full / "checkpoints" / tag
    for rank in (0, 1):
        state = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
        assert state["frozen_param_fragments"] is None and state["frozen_param_shapes"] is None
        assert all(t.numel() == 0 for t in state["module"].values() if isinstance(t, torch.Tensor))
    start = json.loads((full / "metrics.jsonl").read_text().splitlines()[0])
    shard_bytes = min(start["rank_param_bytes"])  # one rank's share of the frozen backbone
    saved = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert saved < 0.05 * shard_bytes, (saved, shard_bytes)
    out = fresh_dir_resuming_from(full, tag, tmp_path / "resumed")
    torchrun(["train", TINY, f"output_dir={out}", *args])
    reference, resumed = losses(full), losses(out)
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert resumed == {s: reference[s] for s in resumed}
    assert torch.equal(load_file(out / "gist.safetensors")["gist"], load_file(full / "gist.safetensors")["gist"])
    # Another world size (universal checkpoint): 1 rank loads exactly the saved gist embeddings.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    one = fresh_dir_resuming_from(full, tag, tmp_path / "one_rank")
    proc = one_rank(["train", TINY, f"output_dir={one}", *args[:2], f"train.max_steps={SAVE_EVERY}"])
    assert "saved by 2 ranks, now 1" in proc.stdout
    saved = get_fp32_state_dict_from_zero_checkpoint(str(full / "checkpoints"), tag=tag)
    assert list(saved) == ["gist_rows.gist"]  # the whole checkpoint: nothing of the backbone
    assert torch.equal(load_file(one / "gist.safetensors")["gist"], saved["gist_rows.gist"])
