"""The agent <-> sandbox <-> user loop: recording, termination, and malformed tool calls that
become error observations and counters instead of exceptions."""
import json

import pytest

from tarl_jax.sandbox import synth
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.episode import AgentReply, UserError, run_episode, run_episodes
from tarl_jax.sandbox.record import AgentTurn, Episode
from tarl_jax.sandbox.user import OfflineUser


@pytest.fixture(scope="module")
def world_and_task():
    world, tasks = synth.make_world(synth.SynthConfig(num_tasks=20))
    return world, next(t for t in tasks if t.extra["kinds"] == ["cancel"])


def call(name, arguments, id="c1"):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


class Scripted:
    """Plays the given messages, then says goodbye."""

    def __init__(self, *messages):
        self.messages = list(messages)
        self.seen = []

    def __call__(self, messages, tools):
        self.seen.append(messages)
        return self.messages.pop(0) if self.messages else {"role": "assistant", "content": "Bye!"}


class Stopper:
    def reply(self, messages):
        return "###STOP###" if any(m["role"] == "assistant" for m in messages) else "Hi, help me."


def test_malformed_calls_become_error_observations(world_and_task):
    world, task = world_and_task
    cases = {
        "bad_json": call("get_order_details", '{"order_id": '),
        "unknown_tool": call("delete_everything", "{}"),
        "missing_argument": call("get_order_details", "{}"),
        "wrong_type": call("get_order_details", '{"order_id": 123}'),
        "unexpected_argument": call("get_order_details", '{"order_id": "#W1", "x": 1}'),
        "too_long": call("get_order_details", json.dumps({"order_id": "#" * 100_000})),
        "malformed_call": {"role": "assistant", "tool_calls": [{"id": "c1", "function": None}]},
    }
    for kind, message in cases.items():
        ep = run_episode(Env(world, task), task, Scripted(message), Stopper())
        assert ep.counters[f"malformed/{kind}"] == 1, (kind, ep.counters)
        tool = [m for m in ep.messages if m["role"] == "tool"]
        assert len(tool) == 1 and tool[0]["content"].startswith("Error: "), kind
        assert tool[0]["tool_call_id"] == "c1"
        turn = ep.agent_turns[0]
        assert turn.message == message and turn.errors and turn.errors[0].startswith(kind)
        assert ep.termination == "user_stop"
        assert len(ep.messages[-2]["content"]) < 1000  # the error names the problem, briefly


def test_valid_and_failing_calls(world_and_task):
    world, task = world_and_task
    order = task.actions[-1].kwargs["order_id"]
    both = {"role": "assistant", "content": None, "tool_calls": [
        # arguments as a dict, no id
        {"function": {"name": "get_order_details", "arguments": {"order_id": order}}},
        {"id": "x", "type": "function", "function": {"name": "get_order_details",
                                                     "arguments": '{"order_id": "#W0"}'}}]}
    ep = run_episode(Env(world, task), task, Scripted(both), Stopper())
    tool = [m for m in ep.messages if m["role"] == "tool"]
    assert json.loads(tool[0]["content"])["order_id"] == order
    assert tool[0]["tool_call_id"] == ep.messages[2]["tool_calls"][0]["id"] == "call_0_0"
    assert tool[1]["content"] == "Error: order not found"
    assert ep.counters["tool_calls"] == 2 and ep.counters["tool_error"] == 1
    assert not any(k.startswith("malformed") for k in ep.counters)
    assert ep.agent_turns[0].message is both  # the exact message, ids not filled in


def test_record_and_reward(world_and_task):
    world, task = world_and_task
    ids = AgentReply(message={"role": "assistant", "content": "Hello"}, prompt_ids=[1, 2],
                     token_ids=[3], logprobs=[-0.5])
    ep = run_episode(Env(world, task), task, Scripted(ids), Stopper())
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant", "user"]
    assert ep.messages[0]["content"] == synth.POLICY
    assert [type(t).__name__ for t in ep.turns] == ["EnvTurn", "EnvTurn", "AgentTurn", "EnvTurn"]
    assert ep.agent_turns[0] == AgentTurn(0, ids.message, [1, 2], [3], [-0.5])
    assert ep.termination == "user_stop" and ep.reward == 0.0  # the cancellation never happened
    assert ep.reward_info["r_actions"] is False
    assert Episode.from_json(ep.to_json()) == ep


def test_expert_reward_both_variants(world_and_task):
    world, task = world_and_task
    for variant in ("taubench", "tarl"):
        ep = run_episode(Env(world, task), task, synth.ExpertAgent(task), OfflineUser(task, world),
                         reward_variant=variant)
        assert ep.reward == 1.0 and ep.reward_info["variant"] == variant


def test_max_steps_and_transfer(world_and_task):
    world, task = world_and_task

    def looping(messages, tools):
        return call("list_all_product_types", "{}")

    ep = run_episode(Env(world, task), task, looping, Stopper(), max_steps=5)
    assert ep.termination == "max_steps" and ep.reward == 0.0
    assert len(ep.agent_turns) == 5 and ep.counters["tool_calls"] == 5
    ep = run_episode(Env(world, task), task,
                     Scripted(call("transfer_to_human_agents", '{"summary": "help"}')), Stopper())
    assert ep.termination == "transfer" and ep.messages[-1]["content"] == "Transfer successful"


def test_agent_and_user_errors_are_recorded(world_and_task):
    world, task = world_and_task

    def broken(messages, tools):
        raise RuntimeError("sampler exploded")

    ep = run_episode(Env(world, task), task, broken, Stopper())
    assert ep.termination == "agent_error" and "sampler exploded" in ep.reward_info["traceback"]
    ep = run_episode(Env(world, task), task, Scripted("not a message"), Stopper())
    assert ep.termination == "agent_error"
    assert "must return an AgentReply" in ep.reward_info["traceback"]

    class Flaky:
        def reply(self, messages):
            if len(messages) > 1:
                raise UserError("endpoint down")
            return "Hi"

    ep = run_episode(Env(world, task), task, Scripted(), Flaky())
    assert ep.termination == "user_error" and "endpoint down" in ep.reward_info["user_error"]
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant"]


def test_run_episodes_in_order():
    world, tasks = synth.make_world(synth.SynthConfig(num_tasks=12))
    eps = run_episodes(tasks, lambda t: Env(world, t), synth.ExpertAgent,
                       lambda t, env: OfflineUser(t, env.world), workers=4)
    assert [e.task_id for e in eps] == [t.task_id for t in tasks]
    assert all(e.reward == 1.0 for e in eps)


def test_unparseable_tool_call_is_answered_not_sent_to_user(world_and_task):
    """A sampling agent's parser reports calls it could not read: the agent gets an error
    observation, the user never sees the broken text, and the turn records why."""
    world, task = world_and_task
    broken = {"role": "assistant", "content": "",
              "parse_errors": ["tool call 0: arguments are not valid JSON"]}
    user_saw = []

    class Recorder(Stopper):
        def reply(self, messages):
            user_saw.append(len(messages))
            return super().reply(messages)

    ep = run_episode(Env(world, task), task, Scripted(broken), Recorder())
    assert ep.counters["malformed/parse"] == 1
    first_reply = ep.messages[3]
    assert first_reply["role"] == "tool" and "not valid JSON" in first_reply["content"]
    assert ep.agent_turns[0].errors == ["parse: tool call 0: arguments are not valid JSON"]
    assert "parse_errors" not in ep.messages[2]
    assert user_saw[1] == 5  # the user spoke next only after the agent's second (text) turn
