"""Training checkpoints of `pretrain --use_parallel`: per-rank model shards + optimizer state.

A checkpoint is `<root>/step_<N>/` holding, for every global rank r, `rank_<r>.safetensors` (its
parameter slices, `checkpoint.save_sharded`: exportable and re-shardable) and
`optim_rank_<r>.safetensors` (moments and step of every AdamW that rank steps, keys
`<j>/<name>` in `step.RankAdamW.adamws()` order), then `parallel_state.json` (step, layout). Each rank file
is written to a temp name and renamed; rank 0 writes the state file only after every rank has
finished (a barrier), so a folder without it is incomplete and never resumed from.
Resume: weights re-shard to any layout (full tensors -> parallelize.py); optimizer state is per
shard, so it needs the layout it was saved with (one-line error otherwise).
`ShardedCheckpointer` is the Trainer's checkpointer for a step with `.pl` (compiled.RankShards:
entries, mesh) and `.optimizer` (step.RankAdamW), i.e. step.ParallelTrainStep.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from qwen3moe.io.safetensors_io import CheckpointError
from qwen3moe.training.checkpoint import latest_checkpoint, step_dirs

STATE = "parallel_state.json"
SHARDED_DIR = "checkpoint_sharded"  # under output_dir


def layout(mesh) -> str:
    return f"dp{mesh.dp}.tp{mesh.tp}.pp{mesh.pp}.ep{mesh.ep}.sp{int(mesh.sp)}"


def rank_optimizers(opt) -> dict[int, list]:
    """Global rank -> the AdamW instances that step its parameters (step.RankAdamW: this
    process's rank, deterministic order)."""
    return {opt.rank: opt.adamws()}


def save(root: str, step: int, pl, opt, rank: int, barrier, keep_last: int = 2, extra: dict | None = None) -> str:
    """Write step_<step> (every process its ranks, rank 0 the state file with `extra`: the model
    config and data geometry a resume must match, recipe.checkpoint_extra); prune old steps."""
    from qwen3moe.io.safetensors_io import write_safetensors
    from qwen3moe.parallel.checkpoint import save_sharded

    d = Path(root) / f"step_{step}"
    save_sharded(pl, d)
    for r, opts in rank_optimizers(opt).items():
        tensors = [(f"{j}/{k}", np.asarray(v, np.float32).reshape(np.shape(v)), "F32")
                   for j, o in enumerate(opts) for k, v in sorted(o.state_arrays().items())]
        tmp = d / f".optim_rank_{r}.safetensors.tmp"
        write_safetensors(str(tmp), tensors, {"format": "qwen3moe-sharded-optimizer"})
        os.replace(tmp, d / f"optim_rank_{r}.safetensors")
    barrier()
    if rank == 0:
        tmp = d / f".{STATE}.tmp"
        tmp.write_text(json.dumps({"step": step, "layout": layout(pl.mesh), "world": pl.mesh.world_size,
                                   "extra": extra or {}}))
        os.replace(tmp, d / STATE)
        for s, old in step_dirs(root, STATE)[:-max(keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        remove_leftovers(root)  # every rank is past the barrier: nothing is being written
    barrier()
    return str(d)


_TEMP = re.compile(rf"^\.((optim_)?rank_\d+\.safetensors|{re.escape(STATE)})\.tmp$")  # save()'s temp names
_RANK_FILE = re.compile(r"^(optim_)?rank_\d+\.safetensors$")


def remove_leftovers(root: str) -> list[str]:
    """Delete what killed saves left under `root`: temp files in step folders, and step folders
    without a state file (a save killed before rank 0 wrote it) holding only rank files: any other
    folder (a single-process checkpoint, user files) is left alone. Call only while no rank
    writes: at start-up (resolve) and by rank 0 between a save's barriers. Returns the paths."""
    from qwen3moe.training.checkpoint import remove_leftovers as remove_matching

    if not os.path.isdir(root):
        return []
    steps = [n for n in os.listdir(root) if re.fullmatch(r"step_\d+", n) and os.path.isdir(os.path.join(root, n))]
    gone = [os.path.join(n, f) for n in steps for f in remove_matching(os.path.join(root, n), _TEMP)]
    for n in steps:
        if all(_RANK_FILE.match(f) for f in os.listdir(os.path.join(root, n))):  # no STATE, nothing foreign
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
            gone.append(n)
    return gone


def resolve(path: str) -> str | None:
    """A step folder, or the newest complete one under a root (removing killed saves' leftovers
    there); None when there is none."""
    if os.path.isfile(os.path.join(path, STATE)):
        remove_leftovers(os.path.dirname(os.path.abspath(path)))
        return path
    remove_leftovers(path)
    return latest_checkpoint(path, STATE)


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE), encoding="utf-8") as fh:
        return json.load(fh)


def check_resume(cfg, path: str) -> None:
    """Refuse to resume `path` with another model config or data geometry than the run's, as
    single-process resume does (trainer.check_resume: one line naming the key and both values,
    unless resume_override); checkpoints without the record pass."""
    from qwen3moe.training.recipe import checkpoint_extra
    from qwen3moe.training.trainer import check_resume as check

    check(read_state(path).get("extra") or {}, checkpoint_extra(cfg), tuple(cfg.resume_override), path)


def load_optimizer(path: str, opt, mesh) -> None:
    """Moments and steps of this process's AdamWs from `path` (same layout required)."""
    from qwen3moe.io.safetensors_io import SafetensorsFile

    saved = read_state(path)["layout"]
    if saved != layout(mesh):
        raise CheckpointError(f"{path}: optimizer state was saved with layout {saved}, this run is {layout(mesh)}; "
                       "resume with the same parallel_config (weights alone re-shard: load them without "
                       "resume_training)")
    for r, opts in rank_optimizers(opt).items():
        f = os.path.join(path, f"optim_rank_{r}.safetensors")
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing (incomplete sharded checkpoint)")
        st = SafetensorsFile(f)
        try:
            for j, o in enumerate(opts):
                o.load_state_arrays({k.split("/", 1)[1]: st.read(k) for k in st.keys() if k.startswith(f"{j}/")})
        finally:
            st.close()


# ---- the Trainer's side ---------------------------------------------------------------------
def resume_path(cfg) -> str | None:
    """The sharded training checkpoint to continue from (resume_training + load_checkpoint)."""
    if not (cfg.resume_training and cfg.load_checkpoint):
        return None
    if os.path.isfile(os.path.join(cfg.load_checkpoint, "config.json")):
        return None  # an HF folder: start from its weights
    found = resolve(cfg.load_checkpoint)
    if found is None:
        raise CheckpointError(f"load_checkpoint {cfg.load_checkpoint}: no complete sharded training checkpoint "
                              f"(step_<N>/{STATE}) to resume from")
    check_resume(cfg, found)  # before any tensor is read
    return found


class ShardedCheckpointer:
    """The Trainer's checkpoints for a sharded step: per-rank shards + optimizer state under
    <output_dir>/checkpoint_sharded; resume loads the optimizer state (the weights were
    re-sharded from the checkpoint when the rank's model was built)."""

    def __init__(self, cfg, step, rank: int, log) -> None:
        self.cfg, self.step, self.rank, self.log = cfg, step, rank, log

    def resume(self, trainer) -> int:
        start = resume_optimizer(self.cfg, self.step.optimizer, self.step.pl.mesh, self.rank, self.log)
        self.step.steps_done = start
        return start

    def save(self, trainer, step: int) -> str:
        from mindspore import Tensor, ops

        from qwen3moe.training.recipe import checkpoint_extra

        c = trainer.config
        barrier = lambda: ops.AllReduce()(Tensor(np.float32(0.0))).asnumpy()  # noqa: E731
        path = save(c.checkpoint_dir, step, self.step.pl, self.step.optimizer, self.rank, barrier,
                    keep_last=c.keep_last, extra=checkpoint_extra(self.cfg))
        if self.rank == 0:
            self.log(f"checkpoint: {path}")
        return path


def resume_optimizer(cfg, opt, mesh, rank: int, log=lambda s: None) -> int:
    """Load the optimizer state of the resumed checkpoint; the step to continue from (0: fresh)."""
    path = resume_path(cfg)
    if path is None:
        return 0
    load_optimizer(path, opt, mesh)
    step = int(read_state(path)["step"])
    if rank == 0:
        log(f"resumed from {path} at step {step}")
    return step
