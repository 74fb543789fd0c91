"""Orbax checkpoints that survive a SIGKILL: train state (arrays) + JSON metadata.

The array state (params, optimiser state, step, rng) goes through orbax's sharded, multi-process
save; everything else exact resume needs (curriculum iterator state, metric history length,
config) is JSON beside it. Saves are asynchronous: `close()` waits for the last one, and the
trainer calls it in a `finally`, so a normal exit or an exception never loses a checkpoint. A
SIGKILL can only lose the save in flight; orbax commits atomically, so the previous one stays
whole and is what `restore` finds.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger("tarl_jax")


# A trainer workdir's layout: rotating train-state checkpoints and the KL reference policy.
STATES, REFERENCE = "checkpoints", "reference"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says which step, where and why."""


def _not_an_orbax_error(record: logging.LogRecord) -> bool:
    # Orbax's writer threads log a failure with whole tracebacks from each thread it passes
    # through (hundreds of lines for one full disk) and then hand the same exception to
    # check_for_errors / wait_until_finished / restore, where this module reports it in a line.
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class Checkpointer:
    """Rotating train-state checkpoints (`<workdir>/checkpoints/<step>/{state,meta}`)."""

    @classmethod
    def for_workdir(cls, workdir, save_every: int = 1) -> "Checkpointer":
        return cls(str(pathlib.Path(workdir) / STATES), save_every=save_every)

    @staticmethod
    def exists(workdir) -> bool:
        """Whether a trainer has started checkpointing in `workdir`."""
        return (pathlib.Path(workdir) / STATES).is_dir()

    def __init__(self, directory: str, max_to_keep: int = 3, save_every: int = 1):
        self.directory = os.path.abspath(directory)
        self._in_flight, self._failed = None, False
        absl = logging.getLogger("absl")
        if _not_an_orbax_error not in absl.filters:
            absl.addFilter(_not_an_orbax_error)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 save_interval_steps=save_every,
                                                 enable_async_checkpointing=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Saves (asynchronously) when the interval or `force` says so, with the checksums of
        every array in the metadata: restore verifies them."""
        self.check()
        if not (force or self.manager.should_save(step)):
            return False
        meta = {**meta, CHECKSUMS: checksums(state)}
        try:   # orbax waits for the previous save first: a failure there is that step's
            self.manager.wait_until_finished()
        except Exception as e:   # noqa: BLE001
            raise self._write_error(e) from e
        self._in_flight = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:   # noqa: BLE001
            raise self._write_error(e) from e

    def check(self) -> None:
        """Raises CheckpointWriteError if a background save failed (e.g. the disk is full):
        the trainer calls save every step, so a run stops within a step of the failure."""
        try:
            self.manager.check_for_errors()
        except Exception as e:   # noqa: BLE001 -- orbax re-raises whatever the writer hit
            raise self._write_error(e) from e

    def _write_error(self, e: Exception) -> "CheckpointWriteError":
        self._failed = True
        where = f"step {self._in_flight} to {self.directory}"
        text = f"{type(e).__name__}: {e}"
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in text:
            return CheckpointWriteError(f"no space left on device while saving {where} "
                                        "(the previous checkpoint is intact; free space and "
                                        "rerun the same command to resume)")
        return CheckpointWriteError(f"saving {where} failed: {text.splitlines()[0][:300]}")

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding).

        step None: the newest checkpoint that reads back whole and matches its checksums; one
        that does not (flipped bits, a truncated file, garbage metadata) is logged, moved aside
        to `<step>.corrupt` and the next older one is tried."""
        if step is not None:
            return self._verified(abstract_state, step)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._verified(abstract_state, step)
            except Exception as e:   # noqa: BLE001 -- any way a checkpoint can be unreadable
                bad = pathlib.Path(self.directory) / str(step)
                log.error("checkpoint %s is corrupt (%s: %s); moved to %s.corrupt, trying an "
                          "older one", bad, type(e).__name__, str(e).splitlines()[0][:300], bad)
                if jax.process_index() == 0:
                    os.replace(bad, f"{bad}.corrupt")
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils
                    multihost_utils.sync_global_devices(f"corrupt checkpoint {step} moved")
                self.manager.reload()
        raise FileNotFoundError(f"no readable checkpoint in {self.directory}")

    def _verified(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state, meta = out["state"], out["meta"]
        want = meta.pop(CHECKSUMS, None)
        if want is not None:
            got = checksums(state)
            bad = sorted(k for k in want if got.get(k) != want[k])
            if bad or set(got) != set(want):
                raise ValueError(f"{len(bad)} arrays differ from their checksums at save "
                                 f"(first: {bad[:3]})")
        return state, meta

    def close(self):
        """Waits for the save in flight; a failure there raises CheckpointWriteError (once: a
        run already stopping for it closes quietly)."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
            self.manager.close()
        except Exception as e:   # noqa: BLE001
            if not self._failed:
                raise self._write_error(e) from e


CHECKSUMS = "checksums"
# Odd multiplier of the position weights (Knuth's): a swap of two words changes the sum too.
_GOLDEN = 2654435761


@jax.jit
def _array_checksums(tree):
    def one(x):
        if x.dtype == jnp.bool_:
            words = x.astype(jnp.uint32)
        else:   # 8-byte types become pairs of uint32 words
            width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
            words = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
        index = jnp.arange(words.size, dtype=jnp.uint32).reshape(words.shape)
        # uint32 sums wrap: exact, and the same however the array is sharded or reduced.
        return jnp.stack([jnp.sum(words), jnp.sum(words * (index * jnp.uint32(_GOLDEN) + 1))])
    return jax.tree.map(one, tree)


def checksums(state: Any) -> dict[str, list[int]]:
    """Two order-independent uint32 checksums of every array's bits (a plain and a
    position-weighted sum), by leaf path: what a checkpoint's restore must read back."""
    sums = jax.device_get(_array_checksums(state))
    return {_leaf_name(path): [int(v) for v in leaf]
            for path, leaf in jax.tree_util.tree_flatten_with_path(sums)[0]}


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a live state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def reference_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir) / REFERENCE


def save_params(path, params: Any) -> None:
    """A one-off parameter tree (e.g. the KL reference policy), written synchronously."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), params, force=True)


def restore_params(path, abstract: Any) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), abstract)


def committed_steps(workdir) -> list[int]:
    """Steps whose save finished, in a trainer workdir (or its checkpoints/ directory). A step
    directory exists while its save is in flight (a live trainer); orbax writes
    commit_success.txt last."""
    directory = pathlib.Path(workdir).resolve()
    directory = directory / STATES if (directory / STATES).is_dir() else directory
    return sorted(int(p.parent.name) for p in directory.glob("*/commit_success.txt")
                  if p.parent.name.isdigit())


def restore_policy(workdir, cfg, step: int | None = None, mesh=None, rules=None):
    """(cfg, params["policy"]) of a trainer checkpoint, the latest committed one by default;
    nothing else (optimizer state, critic) is read. `cfg` (a DecoderConfig) gives the shape;
    its scan_layers is read off the checkpoint. mesh None: the first device."""
    from tarl_jax import sharding
    from tarl_jax.models import qwen
    directory = pathlib.Path(workdir).resolve()   # orbax wants absolute paths
    directory = directory / STATES if (directory / STATES).is_dir() else directory
    if step is None:
        steps = committed_steps(directory)
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {directory}")
        step = steps[-1]
    path = directory / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata
    if metadata is None:
        raise FileNotFoundError(f"{path}: not a readable orbax checkpoint")
    cfg = dataclasses.replace(cfg, scan_layers="layers" in metadata.tree["params"]["policy"])
    shapes = jax.eval_shape(lambda: qwen.init_params(cfg, jax.random.key(0)))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placed = jax.tree.map(lambda _: device, shapes)
    else:
        placed = sharding.logical_sharding(qwen.logical_axes(cfg), mesh,
                                           sharding.DEFAULT_RULES if rules is None else rules)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            shapes, placed)
    target = {"params": {"policy": abstract}}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    return cfg, restored["params"]["policy"]


def warm_start_provenance(config) -> dict:
    """What a saved warm start depends on: a run may only start from one made for its own
    model, world, prompt and tool view."""
    m, w = config.model, config.world
    world = {k: w[k] for k in ("source", "data_dir", "domain", "tool_view", "system_prompt")}
    # (Recorded only where not the default: files made before the option still match.)
    view = w.get("result_view", "full")
    return {"model": {k: m[k] for k in ("preset", "hf_dir", "gguf", "tokenizer")},
            "world": world | ({"result_view": view} if view != "full" else {})
                     | {"synth": dict(w.synth)}}


def warm_start_path(name) -> pathlib.Path:
    """A file path, or the bare name of a warm start shipped in tarl_jax/assets/warmstart/."""
    path = pathlib.Path(name)
    if path.suffix or len(path.parts) > 1:
        return path
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "warmstart" / f"{name}.safetensors"


def _leaf_name(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def save_flat(path, params: Any, meta: dict) -> None:
    """A small parameter tree as one safetensors file (keys "a/b/c"), with `meta` (JSON-able)
    as its metadata: the shipped warm start, made by `main --config.mode=warmstart`."""
    import json

    import numpy as np
    from safetensors.numpy import save_file
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    flat = {_leaf_name(keys): np.asarray(v) for keys, v in leaves}
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})


def load_flat(path, like: Any) -> tuple[Any, dict]:
    """(params shaped and placed like `like`, meta) from `save_flat`'s file; every leaf must be
    there with the same shape and dtype."""
    import json

    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        names = set(f.keys())
        leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        out = []
        for keys, ref in leaves:
            name = _leaf_name(keys)
            if name not in names:
                raise ValueError(f"{path}: no tensor {name!r} (a checkpoint of another model?)")
            x = f.get_tensor(name)
            if x.shape != ref.shape or x.dtype != ref.dtype:
                raise ValueError(f"{path}: {name} is {x.dtype}{list(x.shape)}, the model wants "
                                 f"{ref.dtype}{list(ref.shape)}")
            out.append(jax.device_put(x, ref.sharding) if hasattr(ref, "sharding") else x)
    return jax.tree_util.tree_unflatten(treedef, out), meta


def load_warm_start(config, params, any_world: bool = False) -> tuple[Any, dict]:
    """The policy `warmstart.init` holds (a file `--config.mode=warmstart` wrote; a bare name is
    one shipped in tarl_jax/assets/warmstart/), refused if made for another model or world.

    Args:
      config: the run's config; params: a policy tree of the right shapes (values unused).
      any_world: only the model must match (SFT climbing the level ladder from a file made on
        another level: `warmstart.climb`).
    Returns:
      (the file's params, its SFT figures with "init": the path and "world": the file's).
    """
    path = warm_start_path(config.warmstart.init)
    params, meta = load_flat(path, params)
    want = warm_start_provenance(config)
    if any_world:
        want.pop("world")
    got = {k: meta.get(k) for k in want}
    if got != want:
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        raise ValueError(f"warmstart.init={path} was made for another setting ({diff}, as "
                         "(file, this run)): remake it with --config.mode=warmstart, or set "
                         "warmstart.init='' to warm-start here")
    log.info("warm start: loaded %s (NLL %.3f after %d steps, %.0f s to make)", path,
             meta["sft"]["nll_last"], meta.get("steps", meta["warmstart"]["steps"]),
             meta["seconds"])
    return params, {**meta["sft"], "init": str(path), "world": meta.get("world"),
                    "steps": meta.get("steps", meta["warmstart"]["steps"]),
                    "seconds": meta["seconds"]}
