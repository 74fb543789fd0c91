"""What an RL step reports about itself: compilations (metrics.COMPILES, jax.monitoring's
backend-compile event; a step repeating work already done compiles nothing: no retrace from a
fresh sampler, pack or jitted closure per step), where its time goes, a profile on request."""
import collections

import jax

from tarl_jax import configlib, metrics, trainer
from tarl_jax.bench import trace as trace_lib


def test_a_repeated_rl_step_compiles_nothing_and_the_step_reports_its_compiles(tmp_path):
    c = configlib.load("configs/tiny.py", "runlocal")
    c.model.preset, c.warmstart.steps, c.total_steps = "micro", 2, 3
    c.rl.skip_no_signal = False   # the device step runs even if every group ties (2 SFT steps)
    t = trainer.Trainer(c, str(tmp_path))
    state, _ = t.init_or_restore()
    again = jax.tree.map(lambda x: x.copy(), state)   # the step donates its input
    start = t.curriculum.get_state()
    n0 = metrics.COMPILES.count
    state, first = t.rl_step(state, 0)
    names = collections.Counter(metrics.COMPILES.names[n0:])
    assert first["compile/count"] == sum(names.values()) > 0 and first["compile/seconds"] > 0
    assert names["jit(traced)"] == 1                  # the train step, once
    n1 = metrics.COMPILES.count
    t.curriculum.set_state(start)
    _, repeat = t.rl_step(again, 0)                   # the same tasks, samples and shapes
    assert repeat["compile/count"] == 0, metrics.COMPILES.names[n1:]
    assert repeat["loss"] == first["loss"]            # and it was the same work


def test_the_phases_of_a_step_add_up_to_at_most_the_step(tmp_path):
    c = configlib.load("configs/tiny.py", "runlocal")
    c.model.preset, c.warmstart.steps, c.total_steps = "micro", 2, 2
    c.rl.skip_no_signal = False
    t = trainer.Trainer(c, str(tmp_path))
    state, _ = t.init_or_restore()
    history = []
    for step in range(2):
        state, m = t.rl_step(state, step)
        history.append(m)
    phases = metrics.time_phases(history)
    parts = [v for k, v in phases.items() if k != "whole step"]
    assert len(parts) == 6 and all(v >= 0 for v in parts)
    assert phases["decode"] > 0 and phases["update"] > 0
    assert sum(parts) <= phases["whole step"] + 1e-3
    assert m["time/rollout_decode_s"] + m["time/rollout_prefill_s"] + m["time/rollout_host_s"] \
        <= m["time/rollout_s"] + 1e-3
    assert "time per RL step: decode" in metrics.summary({"history": history}, tmp_path)


def test_profile_step_writes_a_trace_of_that_step(tmp_path):
    c = configlib.load("configs/tiny.py", "runlocal")
    c.model.preset, c.warmstart.steps, c.total_steps, c.eval_every = "micro", 2, 2, 2
    c.profile_step = 2
    trainer.Trainer(c, str(tmp_path)).run()
    [trace] = (tmp_path / "profile").rglob("*.xplane.pb")
    assert trace.stat().st_size > 0
    # The step's programs are in it, and no Python calls crowd them out (bench.trace reads it).
    path = trace_lib.newest_trace(tmp_path / "profile")
    assert {r.module for r in trace_lib.op_times(path)} >= {"jit_decode", "jit_append"}
    names = [e.get("name", "") for e in trace_lib.trace_events(path)]
    assert not [n for n in names if n.startswith("$")], "Python's calls were traced"


def test_per_turn_advantages_compile_once_whatever_the_longest_episode():
    """The turn axis is padded to a fixed width: per-turn credit no longer compiles its
    returns-to-go scan again each step the longest episode's turn count changes."""
    import types

    import numpy as np

    from tarl_jax.rl import advantages, batch

    c = configlib.load("configs/tiny.py", "runlocal,credit=per_turn")
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(2), 4)
    for i, k in enumerate((3, 5, 7, 2)):
        turns = rng.integers(1, k + 1, size=8)
        turns[0] = k
        r = np.where(np.arange(k) < turns[:, None], rng.normal(size=(8, k)), 0).astype(np.float32)
        eps = [types.SimpleNamespace(agent_turns=[None] * n) for n in turns]
        n0 = metrics.COMPILES.count
        got = batch.episode_advantages(c, r.sum(1), r, eps, groups)
        if i:
            assert metrics.COMPILES.count == n0, metrics.COMPILES.names[n0:]
        want = advantages.compute_advantages("grpo", r, groups, credit="per_turn",
                                             turn_mask=np.arange(k) < turns[:, None])
        np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
