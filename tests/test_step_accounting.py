"""What an RL step reports about itself: compilations (metrics.COMPILES, jax.monitoring's
backend-compile event; a step repeating work already done compiles nothing: no retrace from a
fresh sampler, pack or jitted closure per step), where its time goes, a profile on request."""
import collections

import jax

from tarl_jax import configlib, metrics, trainer


def test_a_repeated_rl_step_compiles_nothing_and_the_step_reports_its_compiles(tmp_path):
    c = configlib.load("configs/tiny.py", "runlocal")
    c.model.preset, c.warmstart.steps, c.total_steps = "micro", 2, 3
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
