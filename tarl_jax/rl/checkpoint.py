"""Orbax checkpoints that survive a SIGKILL: train state (arrays) + JSON metadata.

The array state (params, optimiser state, step, rng) goes through orbax's sharded, multi-process
save; everything else exact resume needs (curriculum iterator state, metric history length,
config) is JSON beside it. Saves are asynchronous: `close()` waits for the last one, and the
trainer calls it in a `finally`, so a normal exit or an exception never loses a checkpoint. A
SIGKILL can only lose the save in flight; orbax commits atomically, so the previous one stays
whole and is what `restore` finds.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, save_every: int = 1):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 save_interval_steps=save_every,
                                                 enable_async_checkpointing=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a live state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def save_params(path, params: Any) -> None:
    """A one-off parameter tree (e.g. the KL reference policy), written synchronously."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), params, force=True)


def restore_params(path, abstract: Any) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), abstract)
