"""The trainer's judge wiring: the LLM judge through the project's own server, its fallback
counted, and its agreement with the rule judge reported as step metrics."""
import pathlib

import jax
import numpy as np

from tarl_jax import configlib, serve
from tarl_jax.judge import score
from tarl_jax.models import presets, qwen
from tarl_jax.models.tokenizer import ChatTokenizer, tiny_tokenizer_dir
from tarl_jax.sandbox import synth
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.episode import run_episode
from tarl_jax.sandbox.user import OfflineUser


TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def expert_episodes(n=3):
    world, tasks = synth.make_world(synth.SynthConfig(num_tasks=n))
    return tasks, [run_episode(Env(world, t), t, synth.ExpertAgent(t), OfflineUser(t, world))
                   for t in tasks]


def test_rule_judge_rewards_expert_dialogues():
    tasks, episodes = expert_episodes()
    config = configlib.load(TINY)
    rewards, turn_r, metrics = score.score_episodes(episodes, tasks, config)
    assert all(ep.reward == 1.0 for ep in episodes)
    assert (rewards > 10).all() and (rewards <= 15).all()       # success band, no -1
    np.testing.assert_allclose(turn_r.sum(1), rewards, rtol=1e-6)  # per-turn splits R exactly
    assert metrics["judge/neg_rate"] == 0.0


def test_llm_judge_through_own_server_falls_back_and_is_compared_to_rules(tmp_path):
    tasks, episodes = expert_episodes()
    cfg = presets.get("micro")
    tok = ChatTokenizer(tiny_tokenizer_dir())
    srv = serve.build(tok, cfg, qwen.init_params(cfg, jax.random.key(0)), model_name="judge",
                      cache_len=2048, port=0).start()
    try:
        config = configlib.load(TINY, "judge=llm")
        config.judge.llm.update(base_url=srv.url, model="judge", max_concurrency=4)
        config.judge.llm.cache_dir = str(tmp_path)
        rewards, _, metrics = score.score_episodes(episodes, tasks, config)
    finally:
        srv.close()
    # A random tiny model never writes a valid verdict: every item falls back to the rule judge,
    # counted, none lost; with no verdict of its own there is no LLM-vs-rule agreement to report
    # (the fallbacks are the rule judge's and would read as perfect agreement).
    assert metrics["judge/fallbacks"] == len(episodes)
    assert not any(k.startswith("judge/llm_vs_rule/") for k in metrics)
    assert len(rewards) == len(episodes) and (rewards > 10).all()
