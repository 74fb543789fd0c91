"""bench.table's control (`configs/tiny.py:control`, rl.algo=sft) through the real loop, and the
final evaluation's k samples per task (rollout.final_samples: pass^1 / pass^k)."""
import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(workdir, steps):
    cmd = [sys.executable, "-m", "tarl_jax.main", "--config=configs/tiny.py:runlocal,control",
           "--config.model.preset=micro", f"--config.total_steps={steps}", "--config.eval_every=2",
           "--config.checkpoint_every=1", "--config.rollout.final_samples=2",
           "--config.rl.sft_seconds=4.0", f"--workdir={workdir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return {json.loads(x)["step"]: json.loads(x)
            for x in (workdir / "metrics.jsonl").read_text().splitlines()}


def test_sft_control_trains_for_its_budget_and_resumes_by_step(tmp_path):
    m = run(tmp_path, 2)
    assert sorted(m) == [1, 2]
    # Step 1 pays the compilation; step 2 fits several updates into its 4 s.
    assert m[1]["sft/updates"] >= 1 and m[2]["sft/updates"] > 1
    assert m[2]["time/step_s"] >= 4.0 and m[2]["sft/nll"] < m[1]["sft/nll"]
    assert "outcome" not in m[2] and "reward" not in m[2]      # nothing sampled
    summary = json.loads((tmp_path / "summary.json").read_text())
    final = summary["evals"][-1]
    assert [e["step"] for e in summary["evals"]] == [0, 2]
    writes, succ = final["write_tasks"], final["per_task_sampled"]
    assert final["samples"] == 2 and set(succ) == set(final["per_task"]) and writes
    assert all(0 <= succ[t] <= 2 for t in succ)
    np.testing.assert_allclose(final["pass^1/sampled"], np.mean([succ[t] / 2 for t in writes]))
    np.testing.assert_allclose(final["pass^2/sampled"], np.mean([succ[t] == 2 for t in writes]))
    assert "per_task_sampled" not in summary["evals"][0]   # only the last evaluation samples
    # The checkpoint counts loop steps, not updates: a longer run resumes at step 3.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == "2"
    m = run(tmp_path, 3)
    assert sorted(m) == [1, 2, 3] and m[3]["sft/updates"] >= 1
