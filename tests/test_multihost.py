"""Two JAX processes (gloo CPU collectives, 4 simulated devices each) train together: the same
losses as one process with 8 devices, each host ran only its own episodes, one set of logs."""
import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# PPO: the critic baseline gives every step a gradient, whichever tasks the curriculum draws.
ARGS = ["--config=configs/tiny.py:runlocal,credit=per_turn,algo=ppo", "--config.model.preset=micro",
        "--config.warmstart.steps=0", "--config.total_steps=3", "--config.eval_every=3",
        "--config.checkpoint_every=1", "--config.pack.rows=(8, 16)"]
COMPARED = ("loss", "pg_loss", "tokens", "grad_norm", "reward", "outcome", "ratio", "entropy",
            "eval/pass^1")


def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def metrics(workdir) -> dict[int, dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    one = tmp_path / "one"
    out = subprocess.run([sys.executable, "-m", "tarl_jax.main", *ARGS, f"--workdir={one}"],
                         cwd=REPO, env=env(8), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]

    two = tmp_path / "two"
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tarl_jax.main", *ARGS, f"--workdir={two}", "--multihost",
         f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]

    a, b = metrics(one), metrics(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]   # one set of logs, not one per host
    assert any(a[s]["grad_norm"] > 0 for s in a)  # a real update to compare
    for step in a:
        for key in COMPARED:
            if key in a[step]:
                assert abs(a[step][key] - b[step][key]) <= 1e-4 * max(1.0, abs(a[step][key])), \
                    (step, key, a[step][key], b[step][key])

    # Each host ran only its own episodes; together exactly the single process's episodes.
    for step in (1, 2, 3):
        ids = [[json.loads(line)["task_id"] for line in
                (two / "episodes" / f"step{step:06d}_host{h}.jsonl").read_text().splitlines()]
               for h in (0, 1)]
        single = [json.loads(line)["task_id"] for line in
                  (one / "episodes" / f"step{step:06d}_host0.jsonl").read_text().splitlines()]
        assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
        assert ids[0] + ids[1] == single
