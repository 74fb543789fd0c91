"""Where a profiled program's time goes, op by op: the XLA:CPU ops of a `jax.profiler` trace
(fusions, dots, copies, loops), each op's self time summed over its calls.

    python -m tarl_jax.bench.trace DIR [--top 25] [--module SUBSTRING]

DIR: what `--config.profile_step=N` (WORKDIR/profile) or `jax.profiler.trace(DIR)` wrote; the
newest *.trace.json.gz under it is read. An op's self time leaves out the ops that ran inside it
on the same thread (a while loop's body ops), so the column sums to the device time the trace
saw. It names a program's few expensive ops among its hundreds of cheap ones: it found the two
of session 20 (README, Benchmarks), an argmax taking a fifth of a decode step and a copy of the
whole logits gradient taking a tenth of an update. To see what an op computes, dump the
program's optimised HLO (`XLA_FLAGS=--xla_dump_to=D`) and look the op's name up in
D/*<module>*after_optimizations.txt.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import logging
import pathlib
from typing import NamedTuple

log = logging.getLogger(__name__)
EVENT_CAP = 1_000_000   # a jax.profiler trace keeps at most this many events


class OpTime(NamedTuple):
    module: str
    op: str
    calls: int
    self_us: float


def newest_trace(directory) -> pathlib.Path:
    found = sorted(pathlib.Path(directory).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}: profile a run first "
                                "(--config.profile_step=N, or jax.profiler.trace(DIR))")
    return found[-1]


def trace_events(path) -> list[dict]:
    """The trace's events (Chrome trace format), with a warning when they sit at the cap."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    if len(events) >= EVENT_CAP:
        log.warning("%s holds %d events, the profiler's cap: what ran after them is missing "
                    "(trace fewer steps, or without Python's calls: python_tracer_level=0)",
                    path, len(events))
    return events


def op_times(path) -> list[OpTime]:
    """Every XLA op of the trace (events naming an hlo_op) with its calls and self time,
    the most expensive first."""
    ops = [e for e in trace_events(path) if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    ops.sort(key=lambda e: (e["pid"], e["tid"], e["ts"], -e["dur"]))
    self_us = collections.defaultdict(float)
    calls = collections.Counter()
    stack: list[tuple[float, tuple]] = []      # (end, key) of the ops enclosing this one
    thread = None
    for e in ops:
        if (e["pid"], e["tid"]) != thread:
            thread, stack = (e["pid"], e["tid"]), []
        while stack and stack[-1][0] <= e["ts"]:
            stack.pop()
        key = (e["args"].get("hlo_module", "?"), e["args"]["hlo_op"])
        if stack:
            self_us[stack[-1][1]] -= e["dur"]
        self_us[key] += e["dur"]
        calls[key] += 1
        stack.append((e["ts"] + e["dur"], key))
    rows = [OpTime(m, o, calls[(m, o)], t) for (m, o), t in self_us.items()]
    return sorted(rows, key=lambda r: -r.self_us)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--module", default="", help="only programs whose name contains this")
    args = ap.parse_args(argv)
    path = newest_trace(args.directory)
    rows = [r for r in op_times(path) if args.module in r.module]
    if not rows:
        raise SystemExit(f"{path}: no XLA op events" + (f" in a module matching {args.module!r}"
                                                        if args.module else ""))
    total = sum(r.self_us for r in rows)
    modules = collections.Counter()
    for r in rows:
        modules[r.module] += r.self_us
    print(f"{path}\n{len(rows)} ops, {total / 1e3:.1f} ms of op time; by program: " +
          ", ".join(f"{m} {t / 1e3:.1f} ms" for m, t in modules.most_common(5)))
    print(f"{'self ms':>9} {'share':>6} {'calls':>7} {'us a call':>10}  program / op")
    for r in rows[:args.top]:
        print(f"{r.self_us / 1e3:9.2f} {r.self_us / total:6.1%} {r.calls:7d} "
              f"{r.self_us / r.calls:10.1f}  {r.module} / {r.op}")


if __name__ == "__main__":
    main()
