"""What this machine can do: a large jitted matmul's FLOP/s (float32, bfloat16) and a large
array's streaming bandwidth, measured in the same process as the benchmark that divides by them.

    python -m tarl_jax.bench.limits [--n 2048] [--mb 256] [--repeats 5]

`bench.train_step`, `bench.attention` and `bench.sampler` call `measure()` in their own run and
report model FLOP/s (train: `aot.train_flops`, checked against XLA's `cost_analysis`) as a
fraction of the matmul rate (`shape_rate`: the same at a model's own narrower shapes), and
decode's bytes read a step (weights + the KV window the step reads) x steps/s as a fraction of
the bandwidth (a model whose weights fit the CPU's caches can exceed it: tiny's 1 MB). Best of
--repeats after a compiling call: on a shared machine the best time is the one least disturbed
by other processes.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tarl_jax.bench import best_time


@dataclasses.dataclass(frozen=True)
class Limits:
    matmul_f32: float    # FLOP/s of an n x n x n float32 matmul, jitted
    matmul_bf16: float   # the same in bfloat16 (CPUs without bf16 units run it slower)
    bandwidth: float     # bytes/s streamed over a large float32 array (`bandwidth`)
    n: int
    mb: int

    def line(self) -> str:
        return (f"this machine: matmul {self.matmul_f32 / 1e9:.1f} GFLOP/s float32, "
                f"{self.matmul_bf16 / 1e9:.1f} bfloat16 ({self.n}^3, jitted); memory bandwidth "
                f"{self.bandwidth / 1e9:.1f} GB/s (the better of x + 1 and a matrix-vector product "
                f"over {self.mb} MB)")


def matmul_rate(n: int, dtype, repeats: int) -> float:
    return shape_rate((n, n, n), dtype, repeats)


def shape_rate(shape: tuple, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a jitted [..., m, k] x [..., k, n] matmul, shape = (..., m, k, n): what a
    model's own widths let XLA reach (narrow products cannot fill the cores as 2048^3 does)."""
    *batch, m, k, n = shape
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (*batch, m, k), dtype)
    b = jax.random.normal(k2, (*batch, k, n), dtype)
    f = jax.jit(jnp.matmul)
    _, t, _ = best_time(lambda: f(a, b).block_until_ready(), repeats)
    return 2 * float(np.prod(shape)) / t


def bandwidth(mb: int, repeats: int) -> float:
    """The best streaming rate of two programs over `mb` MB: y = x + 1 (read + write) and a
    matrix-vector product (each weight read once: what a decode step does, and on CPU the
    one XLA spreads over every core where it may run an elementwise op on one)."""
    n = mb * 2 ** 20 // 4
    x = jnp.asarray(np.ones(n, np.float32))
    add = jax.jit(lambda v: v + 1)
    _, t_add, _ = best_time(lambda: add(x).block_until_ready(), repeats)
    side = int(np.sqrt(n))
    w, v = x[:side * side].reshape(side, side), jnp.ones(side, jnp.float32)
    mv = jax.jit(jnp.matmul)
    _, t_mv, _ = best_time(lambda: mv(w, v).block_until_ready(), repeats)
    return max(2 * x.nbytes / t_add, w.nbytes / t_mv)


def decode_bytes(cfg, params, rows: int, window: int, cache_bytes: int = 4) -> int:
    """Bytes one decode step must read: every weight once (shared by the rows) and each row's
    keys and values over the `window` of cache slots it attends to."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * window * cache_bytes
    return weights + rows * kv


def measure(n: int = 2048, mb: int = 256, repeats: int = 5) -> Limits:
    return Limits(matmul_rate(n, jnp.float32, repeats), matmul_rate(n, jnp.bfloat16, repeats),
                  bandwidth(mb, repeats), n, mb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(measure(args.n, args.mb, args.repeats).line())


if __name__ == "__main__":
    main()
