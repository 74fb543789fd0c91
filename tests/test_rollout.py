"""Rollouts through the batched multi-turn sampler: the token stream is exactly what the
policy saw and produced, so the train step's log-probs equal the sampler's."""
import jax
import numpy as np
import pytest

from tarl_jax import rollout
from tarl_jax.models import presets, qwen
from tarl_jax.models.tokenizer import ChatTokenizer, tiny_tokenizer_dir
from tarl_jax.rl import pack
from tarl_jax.rl import step as step_lib
from tarl_jax.sampler import Sampler
from tarl_jax.sandbox import synth
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.episode import run_episode
from tarl_jax.sandbox.user import OfflineUser

CFG = presets.get("micro")


@pytest.fixture(scope="module")
def setup():
    world, tasks = synth.make_world(synth.SynthConfig(num_tasks=12))
    tok = ChatTokenizer(tiny_tokenizer_dir())
    params = qwen.init_params(CFG, jax.random.key(0))

    def run_one(task, agent):
        return run_episode(Env(world, task), task, agent, OfflineUser(task, world), max_steps=3)

    return world, tasks, tok, params, run_one


def test_train_logprobs_equal_sampler_logprobs(setup):
    world, tasks, tok, params, run_one = setup
    sampler = Sampler(CFG, params, cache_len=2048)
    cfg = rollout.DecodeConfig(max_turn_tokens=12, temperature=0.8)
    episodes, stats = rollout.run_batch(tasks[:3], run_one, sampler, tok, cfg, jax.random.key(1),
                                        rollout.minimal_tools)
    assert stats["rounds"] >= 1 and stats["generated_tokens"] > 0
    assert all(ep.agent_turns for ep in episodes)
    # The recorded stream decodes to what each turn's message was parsed from.
    for ep in episodes:
        for turn in ep.agent_turns:
            assert len(turn.token_ids) == len(turn.logprobs) > 0
    packed = pack.pack(episodes, np.ones(len(episodes), np.float32), seq_lens=(2048,), rows=(4,))
    a = packed.arrays
    logp, _, _ = step_lib.forward(CFG, {"policy": params}, a,
                                  step_lib.StepConfig(logprob_chunk=512, temperature=0.8))
    mask = a["loss_mask"]
    assert mask.sum() == sum(len(t.token_ids) for ep in episodes for t in ep.agent_turns) - \
        sum(1 for ep in episodes if not ep.agent_turns[0].prompt_ids)
    diff = np.abs(np.asarray(logp)[mask] - a["logprobs"][mask]).max()
    assert diff < 1e-5, diff
    # Scoring only the gathered policy positions == scoring every position, on the mask.
    assert "policy_index" in a
    full, _, _ = step_lib.forward(CFG, {"policy": params}, {k: v for k, v in a.items()
                                                            if k != "policy_index"},
                                  step_lib.StepConfig(logprob_chunk=512, temperature=0.8))
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(full)[mask], atol=1e-6)
    assert not np.asarray(logp)[~mask].any()


def test_same_seed_same_rollouts(setup):
    world, tasks, tok, params, run_one = setup
    cfg = rollout.DecodeConfig(max_turn_tokens=8, temperature=1.0)
    runs = [rollout.run_batch(tasks[:2], run_one, Sampler(CFG, params, cache_len=2048), tok, cfg,
                              jax.random.key(7))[0] for _ in range(2)]
    ids = [[t.token_ids for ep in eps for t in ep.agent_turns] for eps in runs]
    assert ids[0] == ids[1]


def test_waves_of_max_rows_give_the_same_episodes(setup):
    """rollout.max_rows: 4 episodes 2 rows at a time are the 4 episodes of one batch."""
    world, tasks, tok, params, run_one = setup
    cfg = rollout.DecodeConfig(max_turn_tokens=8, temperature=1.0)
    runs = [rollout.run_batch(tasks[:4], run_one, Sampler(CFG, params, cache_len=2048), tok, cfg,
                              jax.random.key(7), episode_ids=[5, 6, 7, 8], max_rows=rows)
            for rows in (0, 2)]
    streams = [[[t.token_ids for t in ep.agent_turns] for ep in eps] for eps, _ in runs]
    assert streams[0] == streams[1] and all(streams[0])
    assert runs[1][1]["generated_tokens"] == runs[0][1]["generated_tokens"]
    assert runs[1][1]["rounds"] > runs[0][1]["rounds"]       # really in two waves


def test_teacher_stream_equals_policy_format(setup):
    """Warm-start data: the expert's messages tokenised as a policy would generate them, and
    the prompts exactly as a rollout would feed them."""
    world, tasks, tok, params, run_one = setup
    task = tasks[0]
    ep = run_episode(Env(world, task), task,
                     rollout.TeacherAgent(synth.ExpertAgent(task), tok, rollout.minimal_tools),
                     OfflineUser(task, world), max_steps=30)
    assert ep.reward == 1.0
    for turn in ep.agent_turns:
        parsed = tok.parse(turn.token_ids)
        assert not parsed.errors
        want = turn.message
        assert (parsed.message.get("content") or "") == (want.get("content") or "")
        got_calls = [(c["function"]["name"], c["function"]["arguments"])
                     for c in parsed.message.get("tool_calls", [])]
        assert got_calls == [(c["function"]["name"], c["function"]["arguments"])
                             for c in want.get("tool_calls") or []]
    # Prompt of turn k+1 == the rollout stream's append for the messages after turn k.
    stream = rollout._Stream(tok, rollout.minimal_tools, False)
    msgs = [m for m in ep.messages]
    k = 0
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            assert stream.prompt(msgs[:i], Env(world, task).tools) == \
                (ep.agent_turns[k].prompt_ids, [])
            k += 1


def test_context_full_fails_only_that_episode(setup):
    world, tasks, tok, params, run_one = setup
    cfg = rollout.DecodeConfig(max_turn_tokens=8, temperature=1.0)
    # A cache smaller than the first prompt: every episode ends as agent_error, none hangs.
    episodes, _ = rollout.run_batch(tasks[:2], run_one, Sampler(CFG, params, cache_len=64), tok,
                                    cfg, jax.random.key(0), rollout.minimal_tools)
    assert [ep.termination for ep in episodes] == ["agent_error"] * 2
    assert all("ContextFull" in ep.reward_info["traceback"] for ep in episodes)
