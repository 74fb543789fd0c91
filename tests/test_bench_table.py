"""The table driver (tarl_jax/bench/table.py): its aggregation over fake finished runs, checked
against numpy, and the commands it would run."""
import json

import numpy as np
import pytest

from tarl_jax.bench import table


def fake_run(workdir, before, after, steps, wall_s=None):
    """steps: [(outcome, reward, neg_rate or None, math_batch)] for RL steps 1..n."""
    workdir.mkdir(parents=True)
    (workdir / "summary.json").write_text(json.dumps(
        {"evals": [{"step": len(steps), "pass^1": after}, {"step": 0, "pass^1": before}],
         "warmstart": None}))
    lines = []
    for i, (outcome, reward, neg, math) in enumerate(steps, 1):
        rec = {"step": i, "outcome": outcome, "reward": reward, "math_batch": float(math),
               "time/step_s": 10.0 + i, "grad_norm": float(i % 2)}
        if neg is not None:
            rec["judge/neg_rate"] = neg
        lines.append(json.dumps(rec))
    # A resumed run rewrites the steps after its checkpoint: step 2 first with stale numbers.
    stale = json.dumps({"step": 2, "outcome": 99.0, "reward": 99.0, "math_batch": 0.0,
                        "time/step_s": 99.0, "judge/neg_rate": 99.0, "grad_norm": 0.0})
    (workdir / "metrics.jsonl").write_text("\n".join([lines[0], stale, *lines[1:]]) + "\n")
    if wall_s is not None:
        (workdir / table.WALL_FILE).write_text(json.dumps({"wall_s": wall_s}))


def test_aggregate_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    last = 2
    expect = {"before": [], "after": [], "outcome": [], "reward": [], "neg": [], "wall": []}
    for seed in range(3):
        # 5 steps; step 4 is a math batch, so the last 2 tool steps are 3 and 5.
        steps = [(float(o), float(r), float(n), i == 3)
                 for i, (o, r, n) in enumerate(rng.uniform(size=(5, 3)))]
        before, after, wall = rng.uniform(), rng.uniform(), rng.uniform(100, 200)
        fake_run(tmp_path / "tarl_traj_math" / f"seed={seed}", before, after, steps, wall)
        tool = [steps[2], steps[4]]
        expect["before"].append(before)
        expect["after"].append(after)
        expect["outcome"].append(np.mean([s[0] for s in tool]))
        expect["reward"].append(np.mean([s[1] for s in tool]))
        expect["neg"].append(np.mean([s[2] for s in tool]))
        expect["wall"].append(wall)
    # Plain GRPO: no judge metric, one seed only, no wall-time record.
    fake_run(tmp_path / "grpo" / "seed=0", 0.0, 0.25, [(0.5, 5.0, None, False)] * 3)

    rows = {r["variant"]: r for r in table.aggregate(tmp_path, last)}
    math = rows["GRPO + TARL, trajectory + math"]
    assert math["seeds"] == ["0", "1", "2"]
    for key, name in (("before", "before"), ("after", "after"), ("outcome", "outcome"),
                      ("reward", "reward"), ("neg_rate", "neg"), ("wall_s", "wall")):
        np.testing.assert_allclose(math[key], (np.mean(expect[name]), np.std(expect[name])),
                                   rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(math["step_s"], (13.0, 0.0))   # mean of 11..15, stale 99 dropped
    np.testing.assert_allclose(math["updates"], (0.6, 0.0))   # steps 1, 3, 5 of 5 had a gradient
    grpo = rows["GRPO (outcome only)"]
    assert grpo["after"] == (0.25, 0.0) and np.isnan(grpo["neg_rate"][0])
    assert rows["GRPO + TARL, per-turn"]["seeds"] == []

    text = table.markdown(table.aggregate(tmp_path, last), last)
    assert f"| GRPO + TARL, trajectory + math | 3 | {np.mean(expect['before']):.3f} ± " in text
    assert "| GRPO (outcome only) | 1 | 0.000 ± 0.000 | 0.250 ± 0.000 | 0.500 ± 0.000 | 5.00 ± 0.00 | — | 0.67 ± 0.00 |" in text


def test_run_without_evaluation_before_rl_is_refused(tmp_path):
    fake_run(tmp_path / "run", 0.0, 0.0, [(0.0, 0.0, None, False)])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary["evals"] = [e for e in summary["evals"] if e["step"]]
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="step 0"):
        table.run_stats(tmp_path / "run", 4)


def test_commands_share_each_seeds_warm_start(tmp_path):
    runs = table.commands("configs/tiny.py:table", tmp_path, 2, ["--config.x=1"])
    assert len(runs) == 2 * (1 + len(table.VARIANTS))
    ws, cmd = runs[0]
    assert ws == tmp_path / "warmstart" / "seed=0"
    assert "--config=configs/tiny.py:table" in cmd and "--config.total_steps=0" in cmd
    workdir, cmd = runs[4]
    assert workdir == tmp_path / "tarl_traj_math" / "seed=0"
    assert "--config=configs/tiny.py:table,judge=rule,credit=trajectory,math=0.25" in cmd
    assert "--config.seed=0" in cmd and "--config.x=1" in cmd
    assert runs[5][1][runs[5][1].index("--config=configs/tiny.py:table") + 1] == "--config.seed=1"
    assert table.with_args("configs/tiny.py", "judge=none") == "configs/tiny.py:judge=none"


def test_shared_warm_start_is_seed_zeros(tmp_path):
    runs = table.commands("configs/tiny.py", tmp_path, 3, [], shared=True)
    assert [w for w, _ in runs if w.parent.name == "warmstart"] == [tmp_path / "warmstart" / "seed=0"]
    assert len(runs) == 1 + 3 * len(table.VARIANTS)
    assert table.warmstart_dir(tmp_path, 2, True) == tmp_path / "warmstart" / "seed=0"
    assert table.warmstart_dir(tmp_path, 2, False) == tmp_path / "warmstart" / "seed=2"
