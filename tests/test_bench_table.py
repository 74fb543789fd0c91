"""The table driver (tarl_jax/bench/table.py): its aggregation over fake finished runs checked
against numpy, the commands it runs, the control's wall-time budget, resuming."""
import json
import os
import pathlib

import numpy as np
import pytest
from scipy import stats as sps

from tarl_jax import stats
from tarl_jax.bench import table

TASKS = [f"t{i}" for i in range(7)]
WRITES = TASKS[:6]          # t6 needs no write: left out of every figure
K = 4


def fake_run(workdir, greedy, sampled, hist=(), eval_steps=(0,)):
    """greedy: per evaluation a {task: 0/1}; sampled: {task: successes of K} (final eval);
    hist: per-step metric dicts for steps 1..n."""
    workdir.mkdir(parents=True)
    evals = [{"step": st, "per_task": g, "write_tasks": WRITES} for st, g in zip(eval_steps, greedy)]
    evals[-1].update(per_task_sampled=sampled, samples=K)
    (workdir / "summary.json").write_text(json.dumps({"evals": evals[::-1]}))   # order-free
    lines = [json.dumps({"step": i, **h}) for i, h in enumerate(hist, 1)]
    if len(lines) > 1:   # a resumed run rewrites the steps after its checkpoint: stale step 2
        lines.insert(1, json.dumps({"step": 2, "outcome": 99.0, "entropy": 99.0, "grad_norm": 99.0,
                                    "time/step_s": 99.0}))
    (workdir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def random_table(tmp_path, seeds=2, steps=6):
    rng = np.random.default_rng(0)
    truth = {"start": [], "start_k": []}
    for s in range(seeds):
        start = {t: float(rng.integers(2)) for t in TASKS}
        start_k = {t: int(rng.integers(K + 1)) for t in TASKS}
        fake_run(tmp_path / "start" / f"seed={s}", [start], start_k)
        truth["start"].append([start[t] for t in WRITES])
        truth["start_k"].append([start_k[t] for t in WRITES])
        for name, _, _ in table.ARMS:
            after = {t: float(rng.integers(2)) for t in TASKS}
            succ = {t: int(rng.integers(K + 1)) for t in TASKS}
            hist = [{"outcome": float(rng.uniform()), "entropy": float(rng.uniform()),
                     "grad_norm": float(rng.uniform()), "time/step_s": float(rng.uniform(5, 10)),
                     "math_batch": float(name == "tarl_traj_math" and i == 4)}
                    for i in range(steps)]
            if name != table.CONTROL:
                for h in hist:
                    h.update({"behaviour/rule_neg_rate": float(rng.uniform()),
                              "rollout/malformed": float(rng.uniform())})
            fake_run(tmp_path / name / f"seed={s}", [start, after], succ, hist, (0, steps))
            truth.setdefault(name, {"after": [], "succ": [], "hist": []})
            truth[name]["after"].append([after[t] for t in WRITES])
            truth[name]["succ"].append([succ[t] for t in WRITES])
            truth[name]["hist"].append(hist)
    return truth


def test_aggregate_matches_numpy(tmp_path):
    truth, last, reps = random_table(tmp_path), 2, 2000
    agg = table.aggregate(tmp_path, last, reps)
    assert agg["seeds"] == ["seed=0", "seed=1"] and agg["tasks"] == len(WRITES) and agg["samples"] == K
    before = np.array(truth["start"])
    np.testing.assert_allclose(agg["start"]["pass1"][0], before.mean())
    np.testing.assert_allclose(agg["start"]["sampled4"][0], np.mean(np.array(truth["start_k"]) == K))
    control = np.array(truth[table.CONTROL]["after"])
    ses = {}
    for row in agg["arms"]:
        t = truth[row["name"]]
        after, succ = np.array(t["after"]), np.array(t["succ"], float)
        np.testing.assert_allclose(row["after"], (after.mean(), *stats.cluster_bootstrap(after, reps)[:2]))
        np.testing.assert_allclose(row["vs_start"], (np.mean(after - before),
                                                     *stats.cluster_bootstrap(after - before, reps)))
        np.testing.assert_allclose(row["vs_control"][0], np.mean(after - control))
        np.testing.assert_allclose(row["sampled1"][0], np.mean(succ / K))
        np.testing.assert_allclose(row["sampled4"][0], np.mean(succ == K))
        # Training columns: the last `last` tool steps (math batches out), the stale row dropped.
        tool = [[h for h in hs if not h["math_batch"]] for hs in t["hist"]]
        per_seed = [np.mean([h["outcome"] for h in hs[-last:]]) for hs in tool]
        np.testing.assert_allclose(row["outcome"], (np.mean(per_seed), np.std(per_seed)))
        first = [np.mean([h["entropy"] for h in hs[:last]]) for hs in tool]
        np.testing.assert_allclose(row["entropy_first"][0], np.mean(first))
        assert row["grad_norm_max"] == max(h["grad_norm"] for hs in t["hist"] for h in hs) < 99
        if row["name"] == table.CONTROL:
            assert np.isnan(row["malformed"][0]) and np.isnan(row["neg_rate"][0])
        else:
            per_seed = [np.mean([h["rollout/malformed"] for h in hs[-last:]]) for hs in tool]
            np.testing.assert_allclose(row["malformed"][0], np.mean(per_seed))
        ses[row["name"]] = after
    names = [n for n, _, _ in table.ARMS]
    want = np.median([stats.cluster_bootstrap(ses[a] - ses[b], reps)[2]
                      for i, a in enumerate(names) for b in names[i + 1:]])
    np.testing.assert_allclose(agg["detectable"], (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * want)

    text = table.markdown(agg)
    r = agg["arms"][0]
    assert f"| GRPO (outcome only) | {r['after'][0]:.3f} [{r['after'][1]:.3f}, {r['after'][2]:.3f}] |" in text
    assert "| SFT control, same wall time |" in text and "(control)" in text
    table.plot(agg, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_unfinished_seeds_are_left_out(tmp_path):
    random_table(tmp_path, seeds=2)
    (tmp_path / "grpo" / "seed=1" / "summary.json").unlink()
    assert table.aggregate(tmp_path, 2, 100)["seeds"] == ["seed=0"]
    (tmp_path / "grpo" / "seed=0" / "summary.json").unlink()
    with pytest.raises(SystemExit, match="no seed has finished every arm"):
        table.aggregate(tmp_path, 2, 100)


def test_runs_without_a_start_or_samples_are_refused(tmp_path):
    fake_run(tmp_path / "a", [{"t0": 1.0}, {"t0": 1.0}], {"t0": 1}, eval_steps=(3, 6))
    with pytest.raises(ValueError, match="step 0"):
        table.load_run(tmp_path / "a")
    fake_run(tmp_path / "b", [{"t0": 1.0}], {"t0": 1})
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    del summary["evals"][0]["per_task_sampled"]
    (tmp_path / "b" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="final_samples"):
        table.load_run(tmp_path / "b")


def test_commands_start_each_seed_then_its_arms_control_last(tmp_path):
    runs = table.commands("configs/tiny.py:table", tmp_path, 2, ["--config.x=1"])
    assert len(runs) == 2 * (1 + len(table.ARMS))
    start, cmd = runs[0]
    assert start == tmp_path / "start" / "seed=0"
    assert "--config=configs/tiny.py:table" in cmd and "--config.total_steps=0" in cmd
    assert [w.parent.name for w, _ in runs[1:6]] == [n for n, _, _ in table.ARMS][:5]
    assert runs[5][0].parent.name == table.CONTROL == table.ARMS[-1][0]
    assert "--config=configs/tiny.py:table,control" in runs[5][1]
    assert "--config=configs/tiny.py:table,judge=rule,credit=trajectory,math=0.25" in runs[4][1]
    assert "--config.seed=0" in runs[4][1] and "--config.x=1" in runs[4][1]
    assert "--config.seed=1" in runs[6][1]
    assert table.with_args("configs/tiny.py", "judge=none") == "configs/tiny.py:judge=none"


class _Done:
    """What the fakes return in place of a Popen: it finishes (runs `work`) when first polled,
    so the driver sees it running until its next round."""
    def __init__(self, rc, work=lambda: None):
        self.returncode, self.work = None, (rc, work)

    def poll(self):
        if self.returncode is None:
            rc, work = self.work
            work()
            self.returncode = rc
        return self.returncode


def _fake_main(seen, cpus_seen=None, envs=None):
    """A fake tarl_jax.main: each run writes a finished workdir; its step times are known."""
    envs = [] if envs is None else envs
    def run(cmd, stdout, stderr, preexec_fn, env):
        wd = pathlib.Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir=")))
        seen.append(cmd)
        envs.append(env)
        if cpus_seen is not None:
            cpus_seen.append(preexec_fn)
        if wd.parent.name != "start":
            assert (wd / "checkpoints" / "0").is_dir()    # the start's checkpoint, copied

        def work():
            if wd.parent.name == "start":
                (wd / "checkpoints" / "0").mkdir(parents=True)
            step_s = 10.0 * (1 + [n for n, _, _ in table.ARMS].index(wd.parent.name)) \
                if wd.parent.name != "start" else 1.0
            (wd / "metrics.jsonl").write_text(
                "".join(json.dumps({"step": i, "time/step_s": step_s + i}) + "\n" for i in (1, 2)))
            (wd / "summary.json").write_text("{}")
        return _Done(0, work)
    return run


def test_run_all_gives_the_control_the_rl_arms_time_and_resumes(tmp_path, monkeypatch):
    out, seen, envs = tmp_path / "out", [], []
    monkeypatch.setattr(table.time, "sleep", lambda s: None)
    monkeypatch.setattr(table.subprocess, "Popen", _fake_main(seen, envs=envs))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    table.run_all("configs/tiny.py:table", out, 1, [], dry=False)
    assert len(seen) == 1 + len(table.ARMS)
    # Every run compiles into the table's one cache, and keeps the driver's environment.
    assert {e["JAX_COMPILATION_CACHE_DIR"] for e in envs} == {str(out / "xla_cache")}
    assert all(e["PATH"] == os.environ["PATH"] for e in envs)
    # RL arms: 10, 20, 30, 40 (+1.5 each, the mean of steps 1 and 2) -> 26.5 s a step.
    assert seen[-1][-1] == "--config.rl.sft_seconds=26.5"
    assert json.loads((out / "sft" / "seed=0" / table.BUDGET_FILE).read_text()) == {"sft_seconds": 26.5}
    assert all(json.loads((w / table.WALL_FILE).read_text())["wall_s"] >= 0
               for w, _ in table.commands("configs/tiny.py:table", out, 1, []))
    seen.clear()
    table.run_all("configs/tiny.py:table", out, 1, [], dry=False)
    assert seen == []     # every run finished: nothing reruns

    (out / "sft" / "seed=0" / "summary.json").unlink()
    monkeypatch.setattr(table.subprocess, "Popen", lambda cmd, **kw: _Done(3))
    with pytest.raises(SystemExit, match="failed \\(3\\).*sft/seed=0/log.txt"):
        table.run_all("configs/tiny.py:table", out, 1, [], dry=False)


def test_run_all_jobs_keep_each_seed_in_order_on_their_own_cores(tmp_path, monkeypatch):
    """Two jobs: each run pinned (a preexec function), a seed's arms after its start and its
    control after its RL arms, whatever order the jobs finish in."""
    monkeypatch.setattr(table.os, "sched_getaffinity", lambda pid: {0, 1})   # any machine
    out, seen, pins = tmp_path / "out", [], []
    monkeypatch.setattr(table.time, "sleep", lambda s: None)
    monkeypatch.setattr(table.subprocess, "Popen", _fake_main(seen, pins))
    table.run_all("configs/tiny.py:table", out, 2, [], dry=False, jobs=2)
    order = [next(a.split("=", 1)[1] for a in c if a.startswith("--workdir=")) for c in seen]
    assert sorted(order) == sorted(str(w) for w, _ in table.commands("configs/tiny.py:table", out, 2, []))
    for seed in ("seed=0", "seed=1"):
        pos = {pathlib.Path(w).parent.name: i for i, w in enumerate(order) if w.endswith(seed)}
        assert all(pos["start"] < pos[n] for n, _, _ in table.ARMS)
        assert all(pos[n] < pos[table.CONTROL] for n, _, _ in table.ARMS if n != table.CONTROL)
    assert all(callable(p) for p in pins)
    with pytest.raises(ValueError, match="--jobs=99"):
        table.run_all("configs/tiny.py:table", tmp_path / "x", 1, [], dry=False, jobs=99)
