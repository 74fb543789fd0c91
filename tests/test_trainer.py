"""The main job end to end (micro model, runlocal config) and exact resume after SIGKILL."""
import json
import os
import pathlib
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
    """Last record per step (a resumed run rewrites the steps after its checkpoint)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if not k.startswith("time/")}
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


def test_sigkill_then_resume_reproduces_metrics(uninterrupted, tmp_path):
    ref = metrics(uninterrupted[0])
    workdir = tmp_path / "run_b"
    proc = subprocess.Popen(main_cmd(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt = workdir / "checkpoints" / "1"
    deadline = time.time() + 600
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.is_dir(), "no checkpoint of step 1 appeared"
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = metrics(workdir) if (workdir / "metrics.jsonl").exists() else {}
    assert 3 not in partial
    out = subprocess.run(main_cmd(workdir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert metrics(workdir) == ref


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
