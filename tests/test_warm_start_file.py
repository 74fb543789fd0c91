"""The warm start a run can begin from: made by a documented command from the training split
alone, loaded bit for bit, refused when it was made for another model or world."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tarl_jax import configlib, trainer
from tarl_jax.rl import checkpoint
from tarl_jax.rl import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def config(**world):
    c = configlib.load(TINY, "runlocal")
    c.model.preset = "micro"
    c.warmstart.steps = 3
    c.world.synth.update(world)
    return c


def test_the_documented_command_writes_a_file_a_run_starts_from(tmp_path):
    out = tmp_path / "ws.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "tarl_jax.main", f"--config={TINY}:runlocal",
         "--config.model.preset=micro", "--config.warmstart.steps=3", "--config.mode=warmstart",
         f"--workdir={tmp_path / 'make'}", f"--warmstart_out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["path"] == str(out) and report["nll_last"] < report["nll_first"]
    c = config()
    c.warmstart.init = str(out)
    t = trainer.Trainer(c, str(tmp_path / "run"))
    params, meta = checkpoint.load_warm_start(t.config, t._initial_params)
    saved, file_meta = checkpoint.load_flat(out, t._initial_params)
    assert meta["init"] == str(out) and meta["nll_last"] == report["nll_last"]
    # made from the training split alone: the dialogues it saw are the first training tasks'
    assert file_meta["train_tasks"] == len(t.world.train)
    assert file_meta["warmstart"]["episodes"] <= len(t.world.train)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, saved))
    # the same SFT run here gives the same weights: the file is what the command makes
    again, _ = t.warm_start(t._initial_params)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-6), params, again))


def test_a_file_made_for_another_world_or_model_is_refused(tmp_path):
    t = trainer.Trainer(config(), str(tmp_path / "a"))
    path = tmp_path / "ws.safetensors"
    t.save_warm_start(path)
    other = config(seed=5)
    other.warmstart.init = str(path)
    with pytest.raises(ValueError, match="made for another setting"):
        trainer.Trainer(other, str(tmp_path / "b")).init_or_restore()
    bigger = config()
    bigger.model.preset, bigger.warmstart.init = "tiny", str(path)
    with pytest.raises(ValueError, match="the model wants"):
        t2 = trainer.Trainer(bigger, str(tmp_path / "c"))
        checkpoint.load_warm_start(t2.config, t2._initial_params)


def test_shipped_names_resolve_into_the_package():
    p = checkpoint.warm_start_path("tiny-level0")
    assert p == REPO / "tarl_jax" / "assets" / "warmstart" / "tiny-level0.safetensors"
    assert checkpoint.warm_start_path("/x/y.safetensors") == pathlib.Path("/x/y.safetensors")


def test_save_every_writes_the_intermediate_policies_a_length_is_chosen_from(tmp_path):
    c = config()
    c.warmstart.steps, c.warmstart.save_every = 4, 2
    t = trainer.Trainer(c, str(tmp_path / "run"))
    seen = {}
    final, _ = t.warm_start(t._initial_params, lambda step, p, sft: seen.setdefault(
        step, jax.tree.map(np.array, p)))
    t2 = trainer.Trainer(c, str(tmp_path / "run2"))
    meta = t2.save_warm_start(tmp_path / "ws.safetensors")
    assert sorted(p.name for p in tmp_path.glob("ws*.safetensors")) == ["ws-2.safetensors",
                                                                       "ws.safetensors"]
    mid, mid_meta = checkpoint.load_flat(tmp_path / "ws-2.safetensors", t._initial_params)
    assert mid_meta["steps"] == 2 and meta["steps"] == 4
    assert set(mid_meta["sft"]) == set(meta["sft"])   # the summary reads the same fields
    assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-6), mid, seen[2]))
    assert not jax.tree.all(jax.tree.map(np.array_equal, mid, seen[4]))
    # the intermediate file is a warm start a run can begin from, like the final one
    c.warmstart.init = str(tmp_path / "ws-2.safetensors")
    params, _ = checkpoint.load_warm_start(c, t._initial_params)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, mid))


def test_the_shipped_level_0_warm_start_is_the_default_configs_and_solves_validation_tasks(tmp_path):
    """tarl_jax/assets/warmstart/tiny-level0 was made by `--config.mode=warmstart` with this
    config's world, prompt, tool view and SFT settings (README: the command and its cost)."""
    c = configlib.load(TINY, "tune")
    c.warmstart.init = "tiny-level0"
    t = trainer.Trainer(c, str(tmp_path))
    params, meta = checkpoint.load_warm_start(t.config, t._initial_params)
    _, file_meta = checkpoint.load_flat(checkpoint.warm_start_path("tiny-level0"), t._initial_params)
    assert file_meta["steps"] == c.warmstart.steps
    assert {k: file_meta["warmstart"][k] for k in ("lr", "schedule", "episodes", "dialogues")} == \
        {k: c.warmstart[k] for k in ("lr", "schedule", "episodes", "dialogues")}
    state = step_lib.init_state(params, t.optimizer, t.model_cfg, t.ppo, t.state_sh)
    ev = t.evaluate(state)   # greedy, the 64 validation tasks (measured: 0.30)
    assert ev["tasks/writes"] == 64 and 0.15 <= ev["pass^1/writes"] < 0.9


def test_the_shipped_level_1_warm_start_climbed_from_level_0_and_solves_validation_tasks(tmp_path):
    """tarl_jax/assets/warmstart/tiny-level1 is level 1's default start: SFT on level 1's
    expert dialogues climbed from tiny-level0, with this config's world and SFT settings (README:
    the command and its cost)."""
    c = configlib.load(TINY, "level=1,tune")
    assert c.warmstart.init == "tiny-level1"
    c.world.val_tasks = 16     # the 16 validation tasks nearest the test split: a shorter check
    t = trainer.Trainer(c, str(tmp_path))
    params, meta = checkpoint.load_warm_start(t.config, t._initial_params)   # its own world
    _, file_meta = checkpoint.load_flat(checkpoint.warm_start_path("tiny-level1"), t._initial_params)
    assert file_meta["steps"] == c.warmstart.steps
    assert file_meta["climbed_from"]["world"]["synth"]["level"] == 0
    assert file_meta["warmstart"]["init"] == "tiny-level0" and file_meta["warmstart"]["climb"]
    keys = ("lr", "schedule", "episodes", "dialogues", "seq_len", "batch_rows")
    assert {k: file_meta["warmstart"][k] for k in keys} == {k: c.warmstart[k] for k in keys}
    state = step_lib.init_state(params, t.optimizer, t.model_cfg, t.ppo, t.state_sh)
    ev = t.evaluate(state)   # greedy
    assert ev["tasks/writes"] == 16 and 1 / 16 <= ev["pass^1/writes"] < 0.9


def test_the_shipped_compact_level_1_warm_start_climbed_from_level_1_and_solves_validation_tasks(
        tmp_path):
    """tarl_jax/assets/warmstart/tiny-level1c is the start of level 1 with compact tool results
    (`level=1,compact`, the table's harder level): SFT on that world's expert dialogues (1,363
    training tasks) climbed from tiny-level1 (full results), with this config's world and SFT
    settings (README: the command and its cost). A run with full results refuses it."""
    c = configlib.load(TINY, "level=1,compact,tune")
    assert c.warmstart.init == "tiny-level1c" and c.world.result_view == "compact"
    c.world.val_tasks = 16
    t = trainer.Trainer(c, str(tmp_path))
    params, meta = checkpoint.load_warm_start(t.config, t._initial_params)   # its own world
    _, file_meta = checkpoint.load_flat(checkpoint.warm_start_path("tiny-level1c"), t._initial_params)
    assert file_meta["steps"] == c.warmstart.steps
    assert file_meta["world"]["result_view"] == "compact"
    below = file_meta["climbed_from"]["world"]
    assert below["synth"]["level"] == 1 and "result_view" not in below   # full results
    assert file_meta["warmstart"]["init"] == "tiny-level1" and file_meta["warmstart"]["climb"]
    keys = ("lr", "schedule", "episodes", "dialogues", "seq_len", "batch_rows")
    assert {k: file_meta["warmstart"][k] for k in keys} == {k: c.warmstart[k] for k in keys}
    full = configlib.load(TINY, "level=1,tune")
    full.warmstart.init = "tiny-level1c"
    with pytest.raises(ValueError, match="result_view"):
        checkpoint.load_warm_start(full, t._initial_params)
    state = step_lib.init_state(params, t.optimizer, t.model_cfg, t.ppo, t.state_sh)
    ev = t.evaluate(state)   # greedy
    assert ev["tasks/writes"] == 16 and 1 / 16 <= ev["pass^1/writes"] < 0.9
    # More than cancellations (the 300-step file on 201 training tasks solved nothing else)
    assert any(v > 0 for k, v in ev.items() if k.startswith("pass^1/kind/") and "cancel" not in k)


def test_the_demo_argument_starts_from_the_shipped_file_with_the_validated_rl_settings():
    c = configlib.load(TINY, "demo")
    assert c.warmstart.init == "tiny-level0" and checkpoint.warm_start_path("tiny-level0").exists()
    assert (c.rl.credit, c.rl.agg, c.optim.lr, c.rollout.temperature) == ("per_turn", "seq_mean", 1e-4, 0.3)
    assert configlib.load(TINY, "demo,credit=trajectory").rl.credit == "trajectory"
    plain = configlib.load(TINY)
    assert plain.warmstart.init == ""   # the plain default still warm-starts itself
    # ... then runs the same validated RL (it broke its warm start with settings of its own)
    assert (plain.rl.credit, plain.rl.agg, plain.optim.lr, plain.rollout.tasks_per_step,
            plain.total_steps) == (c.rl.credit, c.rl.agg, c.optim.lr, 16, 30) == \
        (c.rl.credit, c.rl.agg, c.optim.lr, c.rollout.tasks_per_step, c.total_steps)
    with pytest.raises(ValueError, match="level 0"):
        configlib.load(TINY, "demo,level=1")


def test_the_summary_reads_a_loaded_warm_start_with_or_without_its_first_nll(tmp_path):
    from tarl_jax import metrics
    evals = [{"step": s, "pass^1": p, "per_task": {"a": p, "b": 0.0}} for s, p in ((0, 0.0), (2, 1.0))]
    for ws, want in (({"nll_last": 0.17, "init": "f.safetensors"}, "NLL 0.17, loaded from f.safetensors"),
                     ({"nll_first": 7.6, "nll_last": 0.2, "expert_solved": 9}, "NLL 7.60 -> 0.20 on 9")):
        text = metrics.summary({"evals": evals, "warmstart": ws}, tmp_path)
        assert want in text and "step 0 0.000" in text and text.startswith("held-out pass^1")
    # a tuning run's evaluations are on the validation split, and its summary says so
    assert metrics.summary({"evals": evals}, tmp_path, "validation").startswith("validation pass^1")


def test_a_warm_start_continues_from_a_file_with_its_steps_counted_on(tmp_path):
    c = config()
    c.warmstart.steps, c.warmstart.save_every = 2, 1
    first = tmp_path / "ws.safetensors"
    trainer.Trainer(c, str(tmp_path / "a")).save_warm_start(first)
    c.warmstart.init = str(first)
    t = trainer.Trainer(c, str(tmp_path / "b"))
    meta = t.save_warm_start(tmp_path / "more.safetensors")
    assert meta["steps"] == 4 and meta["continued_from"] == str(first)
    assert sorted(p.name for p in tmp_path.glob("more*")) == ["more-3.safetensors",
                                                             "more.safetensors"]
    start, start_meta = checkpoint.load_flat(first, t._initial_params)
    more, _ = checkpoint.load_flat(tmp_path / "more.safetensors", t._initial_params)
    assert meta["seconds"] > start_meta["seconds"]
    assert not jax.tree.all(jax.tree.map(np.array_equal, start, more))   # it trained on
    # SFT resumed where the file stopped: its loss is the file's last one, not a fresh start's
    assert meta["sft"]["nll_first"] < start_meta["sft"]["nll_first"]


def test_a_warm_start_climbs_to_another_level_from_a_file_made_on_a_lower_one(tmp_path):
    low = config()
    low.warmstart.steps = 2
    first = tmp_path / "low.safetensors"
    made = trainer.Trainer(low, str(tmp_path / "a")).save_warm_start(first)
    high = config(level=1)
    high.warmstart.update(init=str(first), steps=2)
    with pytest.raises(ValueError, match="made for another setting"):
        trainer.Trainer(high, str(tmp_path / "b")).save_warm_start(tmp_path / "x.safetensors")
    high.warmstart.climb = True
    t = trainer.Trainer(high, str(tmp_path / "c"))
    meta = t.save_warm_start(tmp_path / "high.safetensors")
    # steps count on this level from 0; the file's world and length are kept as provenance
    assert meta["steps"] == 2 and meta["climbed_from"] == {"world": made["world"], "steps": 2}
    assert meta["world"]["synth"]["level"] == 1 and made["world"]["synth"]["level"] == 0
    start, _ = checkpoint.load_flat(first, t._initial_params)
    climbed, _ = checkpoint.load_flat(tmp_path / "high.safetensors", t._initial_params)
    assert not jax.tree.all(jax.tree.map(np.array_equal, start, climbed))
    # a level-1 run starts from the climbed file (its own world), not from the level-0 one
    high.warmstart.update(init=str(tmp_path / "high.safetensors"), climb=False)
    checkpoint.load_warm_start(high, t._initial_params)
    from tarl_jax import config_check
    bad = config()
    bad.warmstart.climb = True
    assert any("warmstart.climb" in p for p in config_check.problems(bad))
