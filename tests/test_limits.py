"""The start-up check: the expert's own path measured against the rollout limits, counted the
way a rollout feeds the policy, and a run that refuses to start when asked to."""
import pathlib

import pytest

from tarl_jax import components, configlib, limits, trainer

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def expert():
    c = configlib.load(TINY, "level=2")   # tau-bench-shaped tasks: long replies, long dialogues
    tok, _, _ = components.load_model({"preset": "micro", "tokenizer": "tiny"})
    world = components.build_world(c)
    tasks = world.train[:40]
    return tok, limits.expert_episodes(world, tok, components.tool_view(c), tasks)


def test_counts_agree_with_the_expert_dialogues(expert):
    tok, eps = expert
    # Independently: the longest assistant message as the tokenizer encodes a reply, and the
    # whole dialogue as the policy is fed it (the rendered prompt up to the last agent turn).
    longest = [max(len(tok.encode_reply(m)) for m in ep.messages if m["role"] == "assistant")
               for ep in eps]
    steps = [sum(m["role"] == "assistant" for m in ep.messages) for ep in eps]
    report = limits.check(eps, max_turn_tokens=48, cache_len=10**9, max_steps=10**9)
    assert report["tasks"] == 40 and report["unsolved"] == 0
    assert report["reply_over_max_turn_tokens"] == sum(n > 48 for n in longest) > 0
    assert report["infeasible"] == report["reply_over_max_turn_tokens"]
    assert report["expert_reply_max"] == max(longest)
    assert report["expert_steps_max"] == max(steps)
    roomy = limits.check(eps, max(longest), report["expert_tokens_max"], max(steps))
    assert roomy["infeasible"] == 0
    tight = limits.check(eps, 10**9, report["expert_tokens_max"] - 1, 10**9)
    assert tight["dialogue_over_cache_len"] >= 1
    assert limits.check(eps, 10**9, 10**9, max(steps) - 1)["steps_over_max_steps"] >= 1


def test_enforce_warns_refuses_or_passes(expert, caplog):
    _, eps = expert
    report = limits.check(eps, 48, 2048, 10)
    assert report["infeasible"] > 0
    with pytest.raises(ValueError, match=f"{report['infeasible']} of 40 train tasks cannot be"):
        limits.enforce(report, "train", "these limits", "error")
    limits.enforce(report, "train", "these limits", "warn")
    assert "WARNING" in caplog.text and "reply_over_max_turn_tokens" in caplog.text
    with pytest.raises(ValueError, match="choose warn"):
        limits.enforce(report, "train", "these limits", "loud")


def test_trainer_refuses_before_anything_expensive(tmp_path):
    c = configlib.load(TINY, "runlocal,level=2")
    c.model.preset, c.rollout.infeasible = "micro", "error"
    c.rollout.max_turn_tokens, c.rollout.cache_len = 48, 2048   # the old demo's limits
    with pytest.raises(ValueError, match="cannot be solved under rollout.max_turn_tokens=48"):
        trainer.Trainer(c, str(tmp_path))
    assert not (tmp_path / "data").exists()   # the curriculum was never prepared


def test_every_level_of_the_default_config_fits_its_limits():
    """configs/tiny.py sizes its limits from the data: the expert's path fits at every level."""
    tok, _, _ = components.load_model({"preset": "micro", "tokenizer": "tiny"})
    for level in (0, 1, 2):
        c = configlib.load(TINY, f"level={level}")
        world = components.build_world(c)
        eps = limits.expert_episodes(world, tok, components.tool_view(c), world.train + world.eval)
        r = c.rollout
        assert limits.check(eps, r.max_turn_tokens, r.cache_len, c.world.max_steps)["infeasible"] == 0


def test_level_0_prompt_names_its_tool_instead_of_listing_schemas():
    """tool_view=none: no schema list (the copy of ids forms in SFT only over a short context),
    while the tools the environment validates calls against are unchanged."""
    tok, _, _ = components.load_model({"preset": "micro", "tokenizer": "tiny"})
    short, listed = configlib.load(TINY), configlib.load(TINY)
    listed.world.tool_view = "minimal"
    world = components.build_world(short)
    task = world.train[:1]
    a = limits.expert_episodes(world, tok, components.tool_view(short), task)[0]
    b = limits.expert_episodes(world, tok, components.tool_view(listed), task)[0]
    first_a, first_b = (tok.decode(ep.agent_turns[0].prompt_ids) for ep in (a, b))
    assert "<tools>" not in first_a and "cancel_pending_order" in first_a
    assert "<tools>" in first_b
    assert len(a.agent_turns[0].prompt_ids) * 4 < len(b.agent_turns[0].prompt_ids)
    assert a.reward == b.reward == 1.0
    assert [t.message for t in a.agent_turns] == [t.message for t in b.agent_turns]


def test_a_step_that_packing_may_not_hold_is_said_at_start_up():
    from tarl_jax import configlib
    from tarl_jax.limits import pack_room
    c = configlib.load("configs/tiny.py", "level=1")
    assert pack_room(c) == ""                       # 16 episodes, rows up to 16 of 4096
    c.rollout.tasks_per_step = 16                   # what stopped a level-1 step after rollouts
    assert "64 episodes of up to 4096 tokens may need 64 rows" in pack_room(c)
    c.pack.rows = (4, 8, 16, 64)
    assert pack_room(c) == ""
    c = configlib.load("configs/tiny.py", "demo")   # 64 episodes of <= 2048: 64 rows of 2048
    assert pack_room(c) == ""
    c.rollout.cache_len, c.pack.seq_lens = 1024, (2048,)
    c.pack.rows = (32,)                             # two a row fit
    assert pack_room(c) == ""
