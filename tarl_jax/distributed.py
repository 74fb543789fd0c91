"""Multi-controller helpers: every host runs the same program on its own share of the work.

Hosts split each step's tasks into contiguous blocks of whole tasks, so the G samples of a task
(one advantage group) always live on one host and advantages need no communication. What must
agree across hosts (batch shapes) or be reported once (metrics, eval results) goes through
`allgather_json`.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """jax.distributed.initialize(); arguments left empty are detected from the cluster
    environment (Cloud TPU, SLURM). CPU-only processes exchange collectives over gloo."""
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)


def host_share(items: Sequence, process: int | None = None, count: int | None = None,
               even: bool = True) -> tuple[list, int]:
    """(this host's contiguous block of `items`, index of its first item). even: every host the
    same number (a training step's tasks: hosts pack and step together); else the first
    len % count hosts take one more (evaluation, demonstrations: 115 tau-bench test tasks over
    8 hosts)."""
    process = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    if even and len(items) % count:
        raise ValueError(f"{len(items)} items do not split evenly over {count} hosts: make the "
                         "per-step task count a multiple of the host count")
    n, extra = divmod(len(items), count)
    start = process * n + min(process, extra)
    return list(items[start:start + n + (process < extra)]), start


def allgather_json(obj: Any) -> list:
    """Every host's `obj` (JSON-serialisable), in process order; [obj] on a single host."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, lengths.ravel())]
