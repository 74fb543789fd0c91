"""Runnable benchmarks (`python -m tarl_jax.bench.NAME`), each printing ratios against a peer
measured in the same run."""
import time


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, best of `repeats` later calls, last result). The first call carries
    compilation and warm-up, so it is reported apart from the steady-state time."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, min(times), out
