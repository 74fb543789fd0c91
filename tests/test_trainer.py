"""The main job end to end (micro model, runlocal config) and exact resume after SIGKILL."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# PPO: the critic baseline gives every step a gradient, whichever tasks the curriculum draws.
# A KL term too, so resume must also restore the reference policy exactly.
ARGS = ["--config=configs/tiny.py:runlocal,credit=per_turn,algo=ppo", "--config.model.preset=micro",
        "--config.total_steps=3", "--config.checkpoint_every=1", "--config.eval_every=3",
        "--config.rl.kl_coef=0.05"]


def main_cmd(workdir):
    return [sys.executable, "-m", "tarl_jax.main", *ARGS, f"--workdir={workdir}"]


def metrics(workdir) -> dict[int, dict]:
    """Last record per step (a resumed run rewrites the steps after its checkpoint), without
    the figures of the process rather than the training: wall times and compilations (a
    resumed run compiles again at its first step)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if not k.startswith(("time/", "compile/"))}
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_a")
    out = subprocess.run(main_cmd(workdir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir, out


def test_main_job_writes_everything(uninterrupted):
    workdir, out = uninterrupted
    m = metrics(workdir)
    assert sorted(m) == [1, 2, 3]
    assert any(r["grad_norm"] > 0 for r in m.values())  # a real update happened
    assert 0.99 < m[1]["ratio"] < 1.01  # rollout log-probs == train log-probs at the first update
    summary = json.loads((workdir / "summary.json").read_text())
    assert [e["step"] for e in summary["evals"]] == [0, 3]
    assert summary["warmstart"]["expert_solved"] == summary["warmstart"]["expert_episodes"] > 0
    assert (workdir / "reward.png").stat().st_size > 1000
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert "pass^1" in out.stdout
    assert (workdir / "summary.txt").read_text().startswith("held-out pass^1")   # the test split
    assert (workdir / "summary.txt").read_text() in out.stdout   # printed as written


def _newer(path: pathlib.Path, since: float) -> bool:
    return path.exists() and path.stat().st_mtime > since


def _metrics_has_step_2(workdir, since):
    path = workdir / "metrics.jsonl"
    return _newer(path, since) and '"step": 2,' in path.read_text()


# Where the kills land, one after another in one run (each resumed run is killed again): after
# checkpoint 1 is on disk; in step 2, after its rollouts (episodes written, update and checkpoint
# to come); after step 2's metrics row, around its checkpoint. Each point is read from files the
# current process wrote (mtime after its start), not ones an earlier process left behind.
KILL_AT = (("after_checkpoint_1", lambda w, t: _newer(w / "checkpoints" / "1", t)),
           ("mid_step_2", lambda w, t: _newer(w / "episodes" / "step000002_host0.jsonl", t)),
           ("after_metrics_2", _metrics_has_step_2))


def test_sigkill_then_resume_reproduces_metrics(uninterrupted, tmp_path):
    """Three kills at three points of one run, then a resume to the end: the metrics equal the
    uninterrupted run's (one chained run instead of one per point: each start costs a compile)."""
    ref = metrics(uninterrupted[0])
    workdir = tmp_path / "run_b"
    for kill_at, ready in KILL_AT:
        since = time.time()
        proc = subprocess.Popen(main_cmd(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = since + 600
        while not ready(workdir, since) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ready(workdir, since), f"{kill_at}: the kill point never came"
        assert proc.poll() is None, f"{kill_at}: the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = metrics(workdir) if (workdir / "metrics.jsonl").exists() else {}
        assert 3 not in partial
    out = subprocess.run(main_cmd(workdir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert metrics(workdir) == ref
    # exactly one row per step, whatever the kills left behind
    rows = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def test_resumed_metrics_hold_one_row_per_step(tmp_path):
    """Rows written after the checkpoint a run resumes from, and a line cut by the crash, are
    dropped when the writer reopens."""
    from tarl_jax.metrics import MetricWriter
    w = MetricWriter(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    w = MetricWriter(tmp_path, resume_step=2)
    w.write(3, {"loss": 30.0})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_serve_mode_answers_with_the_trained_policy(uninterrupted):
    """`--config.mode=serve` puts the workdir's latest policy behind the OpenAI API."""
    import openai
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*main_cmd(uninterrupted[0]), "--config.mode=serve", f"--port={port}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60)
        out = client.chat.completions.create(model="tarl", max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert out.usage.completion_tokens > 0
        assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        proc.kill()
        proc.wait()


def test_a_run_whose_updates_go_non_finite_stops_with_an_error(tmp_path):
    """lr 1e30 makes every update's result overflow: none is applied, and after
    rl.max_nonfinite of them in a row the run stops non-zero (it never exits 0 on NaN)."""
    cmd = [sys.executable, "-m", "tarl_jax.main", *ARGS[:2], "--config.total_steps=3",
           "--config.eval_every=3", "--config.optim.lr=1e30", "--config.rl.max_nonfinite=2",
           f"--workdir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1, out.stderr[-3000:]
    # Step 1 trains only PPO's critic (its own lr; the policy's advantages are all 0 there): the
    # policy's updates overflow from step 2 on.
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: 2 RL steps in a row \(to step 3\) had a non-finite loss or "
                        r"gradient and were not applied; .*", last), last
    assert "Traceback" not in out.stderr
    assert out.stderr.count("the update was not applied") == 2
