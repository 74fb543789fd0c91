"""Mesh, logical-axis rules and resharding: sharding is data, not code.

Parameters and activations carry logical names (`embed`, `mlp`, `q_heads`, ...). A rule table
maps them onto the mesh axes `data`, `fsdp`, `tensor`; changing the parallelism of a run is a
config edit. The same code runs on 1 CPU device, 8 simulated devices and a multi-host pod:
the mesh is built from the global device list and host data enters through
`make_array_from_process_local_data`.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# Flax skips a rule whose mesh axis is already taken in the same spec, so activations
# ("batch", "length", "embed") shard batch over data+fsdp and leave embed whole.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("layers", None),
    ("length", None),
    ("cache_length", None),
    ("head_dim", None),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve a {axis: size} spec with at most one -1 (takes the remaining devices)."""
    unknown = set(spec) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {AXES}")
    sizes = [int(spec.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh spec {dict(spec)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh spec {dict(spec)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh spec {dict(spec)} -> {sizes} needs {math.prod(sizes)} devices, "
                         f"have {num_devices}")
    return tuple(sizes)


def make_mesh(spec: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh over all (global) devices; default puts every device on `data`."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(spec or {"data": -1}, len(devices))
    # Auto axes: classic GSPMD propagation (jax 0.10 defaults make_mesh to Explicit axes).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def local_tensor_mesh(tensor: int) -> Mesh:
    """`tensor` of this host's own devices (-1: all) on the tensor axis: where a host samples
    (rollouts, the server), the policy's heads, MLP and vocabulary and its KV cache's heads cut
    over them (1: one device holds a whole copy)."""
    local = jax.local_devices()
    n = len(local) if tensor == -1 else tensor
    if not 1 <= n <= len(local):
        raise ValueError(f"tensor={tensor}: this host has {len(local)} devices")
    return make_mesh({"tensor": n}, local[:n])


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Rules from config: a sequence of (logical, mesh axis | [mesh axes] | None) pairs."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        for a in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
            if a is not None and a not in AXES:
                raise ValueError(f"rule {logical!r} -> {a!r}: mesh axis must be one of {AXES}")
        out.append((logical, mesh_axes))
    return tuple(out)


def logical_sharding(logical_specs: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def spec(mesh: Mesh, *logical: str | None, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical, list(rules)))


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules=DEFAULT_RULES):
    """The mesh and logical-axis rules in scope, so the models' activation constraints
    (`nn.with_logical_constraint`) take effect; outside it they are silently no-ops and XLA
    alone decides how activations are laid out (on an 8B model over 32 chips it kept every
    row of a microbatch on every chip: 248 GB of temporaries a chip against 31 GB)."""
    with nn.logical_axis_rules(list(rules)), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def in_logical_context(fn, mesh: Mesh, rules=DEFAULT_RULES):
    """fn traced inside `logical_context` (wrap before jax.jit)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with logical_context(mesh, rules):
            return fn(*args, **kwargs)
    return traced


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def reshard(tree: Any, shardings: Any) -> Any:
    """Place a pytree onto target shardings.

    jax.Arrays move with a jitted identity (works across hosts); numpy leaves, assumed to hold
    the same global value on every host, are cut so each device gets only its own slice.
    """
    def put(x, sharding):
        if isinstance(x, jax.Array):
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def host_batch_to_global(batch: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Each host passes its own rows; the result is one global array sharded over `batch`."""
    def put(x):
        x = np.asarray(x)
        sharding = spec(mesh, "batch", *([None] * (x.ndim - 1)), rules=rules)
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(put, batch)
