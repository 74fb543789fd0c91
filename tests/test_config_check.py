"""Config mistakes surface before any expensive work, as one line per mistake naming the key
and what it may hold, exit code 2, nothing written."""
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from tarl_jax import config_check, configlib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arg", ["", "demo", "runlocal", "tune", "algo=ppo,credit=per_turn",
                                 "table", "level=2", "math=0.25,judge=none", "level=1",
                                 "level=1,compact", "level=1,compact,table"])
def test_shipped_configs_pass(arg):
    assert config_check.problems(tiny.get_config(arg)) == []


@pytest.mark.parametrize("arg", ["compact", "level=2,compact", "level=1,table", "level=1,compact,demo"])
def test_configs_without_a_shipped_start_or_world_are_refused(arg):
    with pytest.raises(ValueError, match="compact|shipped warm start"):
        tiny.get_config(arg)


def test_speech_config_passes():
    assert config_check.problems(configlib.load(str(REPO / "configs/tiny_speech.py"))) == []


def test_every_problem_is_one_line_naming_the_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    c = tiny.get_config("")
    c.mode, c.rollout.samples_per_task, c.optim.lr = "bogus", 0, -1.0
    c.rl.algo, c.rl.credit, c.pack.rows = "ppo2", "per-turn", (4, 0)
    c.world.data_dir, c.warmstart.init = "/nonexistent/taubench", "no-such-warm-start"
    c.rollout.top_p, c.world.result_view = 0.0, "terse"
    found = config_check.problems(c)
    by_key = {line.split("=")[0]: line for line in found}
    assert set(by_key) == {"mode", "rollout.samples_per_task", "optim.lr", "rl.algo", "rl.credit",
                           "pack.rows", "world.data_dir", "warmstart.init", "rollout.top_p",
                           "world.result_view"}, found
    assert "choose full | compact" in by_key["world.result_view"]
    assert "choose train | eval | serve | warmstart" in by_key["mode"]
    assert "grpo" in by_key["rl.algo"] and "ppo" in by_key["rl.algo"]
    assert "trajectory | per_turn" in by_key["rl.credit"]
    assert "integer >= 1" in by_key["rollout.samples_per_task"]
    with pytest.raises(config_check.ConfigError):
        config_check.check(c)


def test_an_llm_judge_or_user_needs_an_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    c = tiny.get_config("")
    c.judge.kind = c.user.kind = "llm"
    found = config_check.problems(c)
    assert [line.split(" ")[0] for line in found] == ["user.base_url", "judge.llm.base_url"]
    c.judge.llm.base_url = c.user.base_url = "http://127.0.0.1:8000/v1"
    assert config_check.problems(c) == []
    c.judge.llm.base_url = c.user.base_url = ""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert config_check.problems(c) == []


def run_main(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "tarl_jax.main", *args,
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_main_refuses_an_unknown_key_in_one_line(tmp_path):
    out = run_main("--config.rollout.nope=1", tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == ("config error: --config.rollout.nope: no such key in the "
                                  "config (configs/tiny.py documents every section)")


def test_main_refuses_impossible_values_before_any_work(tmp_path):
    out = run_main("--config.mode=bogus", "--config.rollout.samples_per_task=0", tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines == ["config error: --config.mode='bogus': choose train | eval | serve | warmstart",
                     "config error: --config.rollout.samples_per_task=0: must be an integer >= 1"]
    assert not (tmp_path / "run").exists()      # no workdir, no data, no model
