"""Orbax checkpoints of a run's TrainState: one folder per step, each committed atomically."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from qwen3_jax.train.step import TrainState

PREFIX = "checkpoint"


def last_committed(directory: Path) -> int | None:
    """The step of the newest complete checkpoint in `directory`, read from the folder names alone
    (nothing is created; Orbax's unfinished ones carry a suffix), or None."""
    steps = [int(step) for path in Path(directory).glob(f"{PREFIX}_*")
             if (step := path.name.partition("_")[2]).isdigit() and path.is_dir()]
    return max(steps, default=None)


class Checkpoints:
    """Orbax checkpoints of the TrainState, one folder per step, the last `keep` kept; Orbax writes
    each to a temporary folder and renames it when complete, so a kill leaves no half checkpoint."""

    def __init__(self, directory: Path, *, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, step_prefix=PREFIX, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> Path:
        return Path(self.manager.directory) / f"{PREFIX}_{step}"

    def save(self, step: int, state: TrainState) -> None:
        self.manager.save(step, args=self.ocp.args.StandardSave(_pure(state)))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: TrainState) -> TrainState:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _pure(like))
        restored = self.manager.restore(step, args=self.ocp.args.StandardRestore(target))
        return _unpure(restored, like)


def _pure(state: TrainState) -> dict:
    """The state as nested dicts and lists of arrays (what Orbax stores)."""
    return {"step": state.step, "trainable": nnx.to_pure_dict(state.trainable),
            "opt_state": jax.tree.leaves(state.opt_state)}


def _unpure(pure: dict, like: TrainState) -> TrainState:
    trainable = like.trainable
    nnx.replace_by_pure_dict(trainable, pure["trainable"])
    opt_state = jax.tree.unflatten(jax.tree.structure(like.opt_state), pure["opt_state"])
    return TrainState(pure["step"], trainable, opt_state)
