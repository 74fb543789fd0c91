"""bench.trace: a jax.profiler trace's XLA ops, each op's self time summed over its calls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarl_jax.bench import trace


def test_op_table_counts_calls_and_takes_loop_bodies_out_of_the_loop(tmp_path, capsys):
    @jax.jit
    def looped(x):
        return jax.lax.fori_loop(0, 7, lambda i, c: jnp.tanh(c @ x), x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 128)), jnp.float32)
    jax.block_until_ready(looped(x))                       # compiled outside the trace
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            jax.block_until_ready(looped(x))
    path = trace.newest_trace(tmp_path)
    rows = {r.op: r for r in trace.op_times(path) if r.module == "jit_looped"}
    loops = [op for op in rows if op.startswith("while")]
    body = [op for op, r in rows.items() if r.calls == 21]        # 7 iterations x 3 calls
    assert len(loops) == 1 and rows[loops[0]].calls == 3 and body, rows
    # The loop's own time is its events' whole duration less its body's ops.
    events = [e for e in trace.trace_events(path)
              if e.get("ph") == "X" and e.get("args", {}).get("hlo_op") == loops[0]]
    inclusive = sum(e["dur"] for e in events)
    body_time = sum(rows[op].self_us for op in body)
    assert body_time > 0.5 * inclusive, (body_time, inclusive)
    np.testing.assert_allclose(rows[loops[0]].self_us, inclusive - body_time, atol=1.0)
    assert list(rows) == sorted(rows, key=lambda op: -rows[op].self_us)   # dearest first
    trace.main([str(tmp_path), "--module", "looped", "--top", "3"])
    out = capsys.readouterr().out
    assert out.count("jit_looped / ") == 3, out


def test_a_directory_without_a_trace_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="profile_step"):
        trace.newest_trace(tmp_path)
