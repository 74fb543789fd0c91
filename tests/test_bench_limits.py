"""bench.limits: the machine figures benchmarks divide by, and decode's bytes a step."""
import math

import jax

from tarl_jax import sampler
from tarl_jax.bench import limits
from tarl_jax.models import presets, qwen


def test_decode_bytes_are_the_weights_and_the_rows_cache_window():
    cfg = presets.get("tiny")
    params = qwen.init_params(cfg, jax.random.key(0))
    cache = sampler.init_state(cfg, 3, 256).cache        # the sampler's own cache layout
    per_slot = sum(x.nbytes for x in jax.tree.leaves(cache)) / 256
    weights = limits.decode_bytes(cfg, params, 0, 128)
    assert weights == 4 * qwen.num_params(params)         # float32: 4 bytes a parameter
    assert limits.decode_bytes(cfg, params, 3, 128) - weights == per_slot * 128


def test_measured_rates_are_finite_and_the_line_names_them():
    lim = limits.measure(n=128, mb=4, repeats=1)
    for rate in (lim.matmul_f32, lim.matmul_bf16, lim.bandwidth):
        assert math.isfinite(rate) and rate > 0
    assert f"{lim.matmul_f32 / 1e9:.1f} GFLOP/s float32" in lim.line()
