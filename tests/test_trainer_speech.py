"""The main job in speech mode (configs/tiny_speech.py on the micro model): a text warm-up
batch, then speech batches whose users speak through espeak-ng; pass^1 for text and speech users.
The audio encoder trains too (model.train_audio), so rollouts must hear with each new version."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from tarl_jax.sandbox.record import Episode

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng not installed (scripts/setup.sh installs it)")


def test_speech_config_trains_on_spoken_and_text_batches(tmp_path):
    workdir = tmp_path / "run"
    # PPO: whitened GAE advantages are never all zero, so every update moves the encoder.
    cmd = [sys.executable, "-m", "tarl_jax.main", "--config=configs/tiny_speech.py:runlocal,algo=ppo",
           "--config.model.preset=micro", "--config.model.audio=micro", "--config.total_steps=3",
           "--config.model.train_audio=True", "--config.optim.lr=1e-2",
           "--config.curriculum.schedule=speech",
           "--config.eval_every=3", "--config.world.eval_tasks=2",
           "--config.world.max_steps=6", f"--config.speech.cache_dir={tmp_path / 'tts'}",
           f"--workdir={workdir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    assert [steps[s]["speech_batch"] for s in (1, 2, 3)] == [0, 1, 1]   # warm-up, then speech
    for s in (1, 2, 3):
        # On-policy: the update's log-probs (the step encoding the rows' log-mel) == the
        # sampler's (embeddings of the encoder version the state held at rollout time).
        assert 0.99 < steps[s]["ratio"] < 1.01, steps[s]
        assert steps[s]["approx_kl_old"] < 1e-8, steps[s]
    # Step 2's update moved the encoder; step 3's rollouts heard with the new one (stale cached
    # embeddings would show as approx_kl_old > 0 above).
    assert steps[2]["grad_norm/audio"] > 1e-3, steps[2]
    spoken = [Episode.from_json(l) for l in (workdir / "episodes" / "step000002_host0.jsonl")
              .read_text().splitlines()]
    assert spoken and all(ep.mode == "speech" for ep in spoken)
    assert any(ep.termination in ("user_stop", "max_steps") for ep in spoken)   # whole dialogues
    for ep in spoken:
        users = [t for t in ep.turns if getattr(t, "kind", None) == "user"]
        assert users[0].audio and len(users[0].audio[0]) == 64        # a sha256 ref
        assert ep.agent_turns[0].audio == users[0].audio
    texts = [Episode.from_json(l) for l in (workdir / "episodes" / "step000001_host0.jsonl")
             .read_text().splitlines()]
    assert all(ep.mode == "text" and not any(t.audio for t in ep.agent_turns) for ep in texts)
    summary = json.loads((workdir / "summary.json").read_text())
    for ev in summary["evals"]:
        assert {"pass^1", "pass^1/speech"} <= set(ev)
