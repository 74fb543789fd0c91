"""What this machine can do: a large jitted matmul's FLOP/s (float32, bfloat16) and a large
array's streaming bandwidth, measured in the same process as the benchmark that divides by them.

    python -m tarl_jax.bench.limits [--n 2048] [--mb 256] [--repeats 5]

`bench.train_step` and `bench.sampler` call `measure()` in their own run and report model FLOP/s
(train: `aot.train_flops`, checked against XLA's `cost_analysis`) as a fraction of the matmul
rate, and decode's bytes read per token (weights + the KV window the step reads) x tokens/s as a
fraction of the bandwidth. Best of --repeats after a compiling call: on a shared machine the
best time is the one least disturbed by other processes.
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
    bandwidth: float     # bytes/s moved by y = x + 1 over a large float32 array (read + write)
    n: int
    mb: int

    def line(self) -> str:
        return (f"this machine: matmul {self.matmul_f32 / 1e9:.1f} GFLOP/s float32, "
                f"{self.matmul_bf16 / 1e9:.1f} bfloat16 ({self.n}^3, jitted); memory bandwidth "
                f"{self.bandwidth / 1e9:.1f} GB/s (x + 1 over {self.mb} MB, read + write)")


def matmul_rate(n: int, dtype, repeats: int) -> float:
    k1, k2 = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), dtype) for k in (k1, k2))
    f = jax.jit(jnp.matmul)
    _, t, _ = best_time(lambda: f(a, b).block_until_ready(), repeats)
    return 2 * n ** 3 / t


def bandwidth(mb: int, repeats: int) -> float:
    x = jnp.asarray(np.ones(mb * 2 ** 20 // 4, np.float32))
    f = jax.jit(lambda v: v + 1)
    _, t, _ = best_time(lambda: f(x).block_until_ready(), repeats)
    return 2 * x.nbytes / t


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
