"""Checkpoints through DeepSpeed's own (sharded) checkpointing, plus the loader position and RNG.

Layout of OUTPUT_DIR/checkpoints/:
    latest                      text: the tag of the newest complete checkpoint
    step00000040/               DeepSpeed's ZeRO shards (model, optimizer, scheduler) and
        trainer_state.json      step, world size, data-loader position (rank 0)
        rng_rank{r}.json        every RNG state of rank r (python, numpy, torch, cuda)
        universal/              made on demand when resuming at another world size

Atomic publication: every rank writes under a temporary tag; after a barrier rank 0 renames it
to its final tag and only then rewrites `latest` (write a temp file, then rename). A crash
during a save leaves `latest` on the previous complete checkpoint; stale temp tags are removed
by the next save.

Safe loading: DeepSpeed's TorchCheckpointEngine calls torch.load(weights_only=False); we swap in
an engine that loads with weights_only=True, allowing only DeepSpeed's two plain state classes.
Our own state is JSON, so no pickle of ours is ever loaded.

Fault injection for tests (tiny, off unless set): GIST_DIST_FAULT=die_in_save:rankN makes rank N
exit hard after writing its shards and before the checkpoint is published (append :stepS to
pick one save).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from . import dist
from .artifact import ArtifactError
from .atomic import write_text

FAULT_ENV = "GIST_DIST_FAULT"
STATE_FILE = "trainer_state.json"


class CheckpointError(ArtifactError):
    """A checkpoint that cannot be used: one line naming the directory and the reason."""


def rng_state() -> dict:
    py = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _maybe_fault(point: str, step: int):
    """Test hook: GIST_DIST_FAULT=<point>:rank<N>[:step<S>] kills rank N here, as a crash would."""
    here = f"{point}:rank{dist.rank()}"
    if os.environ.get(FAULT_ENV) in (here, f"{here}:step{step}"):
        print(f"gist-dist: fault injected: {point} on rank {dist.rank()}", file=sys.stderr, flush=True)
        os._exit(13)


def load_weights_only(path: str, map_location=None):
    """torch.load(weights_only=True), allowing DeepSpeed's two plain state classes only."""
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load, it holds more than tensors ({str(e).strip().splitlines()[-1][:200]})"
        ) from None


def use_safe_loading(engine):
    """Make DeepSpeed read checkpoint files through load_weights_only."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        safe = WeightsOnlyCheckpointEngine(engine._config)
        safe.__dict__.update(engine.checkpoint_engine.__dict__)
        engine.checkpoint_engine = safe


def check_pickles(folder: Path):
    """Refuse .pt files that would need more than tensors and DeepSpeed's plain state classes.

    For DeepSpeed's universal-checkpoint loader, which calls torch.load itself: the scan reads
    the pickle's opcodes without running them.
    """
    allowed = {"deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum"}
    for f in sorted(folder.rglob("*.pt")):
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f))) - allowed
        if unsafe:
            raise CheckpointError(f"{f}: refusing to load, it needs code objects {sorted(unsafe)}")


def _swapped_groups(engine) -> list[int]:
    """The ZeRO-3 sub-groups whose fp32 master partition and Adam moments live on NVMe between steps."""
    opt = getattr(engine, "optimizer", None)
    if not getattr(opt, "swap_optimizer", False):
        return []
    return [i for i in range(len(opt.fp16_groups)) if opt._swappable_optimizer_subgroup(i)]


@contextlib.contextmanager
def optimizer_state_in_memory(engine):
    """With the optimizer offloaded to NVMe, DeepSpeed's state_dict() (0.19.8) saves the swapped-out
    fp32 partition and Adam moments as empty tensors: the checkpoint would hold no master weights (the
    universal checkpoint and zero_to_fp32 read them) and no moments. Swap them in (as a step does)
    while the block runs, and back out after."""
    groups, opt = _swapped_groups(engine), engine.optimizer
    for i in groups:
        opt._optimizer_states_and_gradient_swap_in(i)
    try:
        yield
    finally:
        for i in groups:
            opt._optimizer_states_and_gradient_swap_out(i)


def restore_swapped_optimizer_state(engine, checkpoints: Path, tag: str):
    """After DeepSpeed's load (0.19.8) with the optimizer on NVMe, the Adam state in use is not the
    checkpoint's: the step count starts over and the moments differ, and a sub-group too small to be
    swapped (a distill run's gist rows) also loses its fp32 weights (docs/reliability.md). Write this
    rank's saved fp32 partitions and Adam state back, into the swapped-in tensors where they swap,
    and refresh the working partitions from them."""
    opt = engine.optimizer
    if not getattr(opt, "swap_optimizer", False):
        return
    saved = engine.checkpoint_engine.load(engine._get_zero_ckpt_name(str(checkpoints), tag), map_location="cpu")
    saved = saved["optimizer_state_dict"]
    opt._set_fp32_optimizer_param_groups()  # the order in which torch numbered the state at the save
    order = [p for group in opt.optimizer.param_groups for p in group["params"]]
    opt._clear_fp32_optimizer_param_groups()
    for i, param in enumerate(opt.fp32_partitioned_groups_flat):
        swapped = opt._swappable_optimizer_subgroup(i)
        state = saved["optimizer_state_dict"]["state"][next(k for k, p in enumerate(order) if p is param)]
        if swapped:
            opt._optimizer_states_and_gradient_swap_in(i)
        param.data.copy_(saved["fp32_flat_groups"][i])
        live = opt.optimizer.state[param]
        for key, value in state.items():
            if torch.is_tensor(live.get(key)) and live[key].numel() == value.numel() > 1:
                live[key].data.copy_(value)  # a swapped tensor: its storage is the swap buffer
            else:
                live[key] = value.to(live[key].device) if torch.is_tensor(live.get(key)) else value
        opt._reassign_or_swap_out_partitioned_parameters(i)  # the working (fp16/bf16) partition from fp32
        if swapped:
            opt._optimizer_states_and_gradient_swap_out(i)


class Checkpointer:
    def __init__(self, directory: Path, keep: int, frozen_backbone: bool = False):
        self.dir = Path(directory)
        self.keep = keep
        # Distill: the frozen backbone is rebuilt from the base model on resume, so its shards
        # (half a 7B model per rank on 2 ranks) are left out; only the gist embeddings are saved.
        self.frozen_backbone = frozen_backbone

    def latest_tag(self) -> str | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not (self.dir / tag / STATE_FILE).is_file():  # never silently start over
            raise CheckpointError(
                f"{pointer} names {tag!r}, which is not a complete checkpoint "
                f"(no {STATE_FILE}); point it at one or remove it to start fresh"
            )
        return tag

    def save(self, engine, batches, step: int) -> str:
        """Write and publish checkpoint `step`; returns its tag."""
        tag, tmp_tag = f"step{step:08d}", f"tmp-step{step:08d}"
        # Saving the same step twice (save_every hit the last step) would briefly unpublish it.
        already = dist.all_reduce([float(dist.is_main() and self.latest_tag() == tag)], op="max")[0] > 0
        if already:
            return tag
        if dist.is_main():
            shutil.rmtree(self.dir / tmp_tag, ignore_errors=True)
        dist.barrier()
        with optimizer_state_in_memory(engine):
            engine.save_checkpoint(
                str(self.dir), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=self.frozen_backbone
            )
        write_text(self.dir / tmp_tag / f"rng_rank{dist.rank()}.json", json.dumps(rng_state()))
        if dist.is_main():
            write_text(
                self.dir / tmp_tag / STATE_FILE,
                json.dumps({"step": step, "world_size": dist.world(), "loader": batches.state_dict()}),
            )
        _maybe_fault("die_in_save", step)
        dist.barrier()  # every rank has finished writing its shards
        if dist.is_main():
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            os.replace(self.dir / tmp_tag, self.dir / tag)
            write_text(self.dir / "latest", tag)
            self._prune(tag)
        dist.barrier()
        return tag

    def _prune(self, newest: str):
        """Keep the newest `keep` complete checkpoints; the published one is never removed."""
        tags = sorted(p.name for p in self.dir.glob("step*") if (p / STATE_FILE).is_file())
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != newest:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        for stale in self.dir.glob("tmp-step*"):
            shutil.rmtree(stale, ignore_errors=True)

    def resume(self, engine, batches) -> int:
        """Load the latest complete checkpoint if there is one; returns the step to continue from."""
        tag = self.latest_tag()
        if tag is None:
            return 0
        folder = self.dir / tag
        state = json.loads((folder / STATE_FILE).read_text())
        use_safe_loading(engine)
        if state["world_size"] == dist.world():
            load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=not self.frozen_backbone)
        else:
            load_path = self._load_universal(engine, folder, state["world_size"])
        if load_path is None:
            raise CheckpointError(f"{folder}: DeepSpeed could not load this checkpoint")
        if state["world_size"] == dist.world():
            restore_swapped_optimizer_state(engine, self.dir, tag)
        batches.load_state_dict(state["loader"])
        rng = folder / f"rng_rank{dist.rank()}.json"
        if rng.is_file() and state["world_size"] == dist.world():
            set_rng_state(json.loads(rng.read_text()))
        dist.log(
            f"gist-dist: resumed from {folder} at step {state['step']} "
            f"(saved by {state['world_size']} ranks, now {dist.world()})"
        )
        return int(state["step"])

    def _load_universal(self, engine, folder: Path, saved_world: int):
        """Another world size: convert once with DeepSpeed's ds_to_universal, then load that."""
        if engine.zero_optimization_stage() != 3:
            raise CheckpointError(
                f"{folder}: saved by {saved_world} ranks, resuming with {dist.world()}; "
                f"only ZeRO-3 checkpoints can change world size here"
            )
        if _swapped_groups(engine):  # its loader looks for per-rank files the nvme swapper never writes
            raise CheckpointError(
                f"{folder}: saved by {saved_world} ranks, resuming with {dist.world()}: DeepSpeed cannot "
                f"load another world size's checkpoint with the optimizer on nvme; resume on "
                f"{saved_world} ranks, or with zero.offload_optimizer=cpu (its checkpoints load either way)"
            )
        universal = folder / "universal"
        error = ""
        if dist.is_main() and not universal.is_dir():
            tmp = folder / "universal.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    str(folder),
                    "--output_folder",
                    str(tmp),
                    "--num_extract_workers",
                    "1",
                    "--num_merge_workers",
                    "1",
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode == 0:
                os.replace(tmp, universal)
            else:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        failed = dist.all_reduce([float(bool(error))], op="max")[0] > 0
        if failed:
            raise CheckpointError(
                f"{folder}: saved by {saved_world} ranks, resuming with {dist.world()}; "
                f"universal conversion failed: {error or 'see rank 0'}"
            )
        check_pickles(universal)
        engine._config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(str(folder), tag="universal")
        finally:
            engine._config.load_universal_checkpoint = False
        return load_path
