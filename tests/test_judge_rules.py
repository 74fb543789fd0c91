"""Rule judge on dialogues built from tau-bench v1 retail gold actions, intact and perturbed."""
import copy
import dataclasses
import json

import pytest

from tarl_jax.judge import rules
from tarl_jax.judge.reward import trajectory_reward
from tarl_jax.sandbox.record import AgentTurn, Episode, EnvTurn


@pytest.fixture(scope="module")
def retail(taubench_dir):
    tasks = json.loads((taubench_dir / "v1/retail/tasks_test.json").read_text())
    refs = [json.loads(x) for x in (taubench_dir / "v1/reference/retail_test.jsonl").open()]
    for t in tasks:
        t["domain"] = "retail"
    return tasks, refs


def gold_dialogue(task, observations):
    """User asks; each gold call is one assistant tool_call message answered by the recorded
    observation; a final text turn says the required outputs (when there are any)."""
    msgs = [{"role": "user", "content": task["instruction"]}]
    for k, (a, obs) in enumerate(zip(task["actions"], observations, strict=True)):
        msgs.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{k}", "type": "function",
            "function": {"name": a["name"], "arguments": json.dumps(a["kwargs"])}}]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{k}", "name": a["name"],
                     "content": obs if obs is not None else "Transfer successful"})
    if task["outputs"]:
        msgs.append({"role": "assistant", "content": "The answer is " + ", and ".join(task["outputs"])})
    return msgs


def assistant_positions(msgs):
    return [i for i, m in enumerate(msgs) if m["role"] == "assistant"]


def last_effective_write(task, obs):
    """Index of the last gold write whose recorded observation is not an error, or None."""
    ks = [k for k, a in enumerate(task["actions"]) if a["name"] in rules.write_tools("retail")
          and not str(obs[k]).startswith("Error")]
    return ks[-1] if ks else None


def test_gold_dialogues_all_plus_one(retail):
    tasks, refs = retail
    errors_seen, empty = 0, 0
    for i, (task, ref) in enumerate(zip(tasks, refs, strict=True)):
        msgs = gold_dialogue(task, ref["observations"])
        j = rules.judge(task, msgs)
        assert j.scores == [1] * len(assistant_positions(msgs)), (i, j.reasons)
        assert j.source == "rule" and j.meta["negative_kind"] is None
        assert j.meta["unmatched_gold"] == [] and j.meta["unsaid_outputs"] == []
        if j.scores:
            assert trajectory_reward(j.scores, 1) == 15.0
        else:   # a task whose right answer is to do and say nothing particular
            empty += 1
        errors_seen += any(str(o).startswith("Error") for o in ref["observations"])
    # Gold calls that tau-bench answers with an error still match the gold (+1).
    assert errors_seen == 19 and empty == 1


def test_wrong_argument_gets_the_minus_one(retail):
    tasks, refs = retail
    checked = 0
    for task, ref in zip(tasks, refs):
        k = last_effective_write(task, ref["observations"])
        if k is None:
            continue
        msgs = gold_dialogue(task, ref["observations"])
        call = msgs[2 * k + 1]["tool_calls"][0]["function"]
        kwargs = json.loads(call["arguments"])
        key = "payment_method_id" if "payment_method_id" in kwargs else next(
            n for n, v in kwargs.items() if isinstance(v, str))
        kwargs[key] += "_x"
        call["arguments"] = json.dumps(kwargs)
        j = rules.judge(task, msgs)
        assert j.scores.count(-1) == 1 and j.negative_turn == k, j.reasons
        assert j.meta["negative_kind"] == "wrong_args" and key in j.reasons[k]
        assert sum(s == 1 for s in j.scores) == len(j.scores) - 1
        assert -5 <= trajectory_reward(j.scores, 0) < 0
        checked += 1
    assert checked > 80


def test_dropped_write_gets_the_minus_one(retail):
    tasks, refs = retail
    checked = 0
    for task, ref in zip(tasks, refs):
        k = last_effective_write(task, ref["observations"])
        if k is None:
            continue
        msgs = gold_dialogue(task, ref["observations"])
        # The agent claims it is done instead of calling the tool: its tool result goes too.
        msgs[2 * k + 1:2 * k + 3] = [{"role": "assistant", "content": "All done, it is processed."}]
        j = rules.judge(task, msgs)
        assert j.negative_turn == k and j.scores.count(-1) == 1, j.reasons
        assert j.meta["negative_kind"] == "missing_write"
        checked += 1
    assert checked > 80


def tool_turn(name, kwargs, result="{}", call_id=None):
    call_id = call_id or f"id_{name}_{len(json.dumps(kwargs))}"
    return [{"role": "assistant", "content": None, "tool_calls": [{
        "id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(kwargs)}}]},
            {"role": "tool", "tool_call_id": call_id, "name": name, "content": result}]


TASK = {"instruction": "return two items", "domain": "retail", "outputs": [], "actions": [
    {"name": "get_order_details", "kwargs": {"order_id": "#W1"}},
    {"name": "exchange_delivered_order_items", "kwargs": {
        "order_id": "#W1", "item_ids": ["a", "b"], "new_item_ids": ["A", "B"],
        "payment_method_id": "gift_card_1"}}]}


def test_order_insensitive_where_tau_bench_is():
    pairs_swapped = {"payment_method_id": "gift_card_1", "new_item_ids": ["B", "A"],
                     "item_ids": ["b", "a"], "order_id": "#W1"}
    j = rules.judge(TASK, tool_turn("exchange_delivered_order_items", pairs_swapped))
    assert j.scores == [1]
    broken_pairs = dict(pairs_swapped, new_item_ids=["A", "B"])   # b->A, a->B: another exchange
    j = rules.judge(TASK, tool_turn("exchange_delivered_order_items", broken_pairs))
    assert j.scores == [-1] and j.meta["negative_kind"] == "wrong_args"
    assert rules.args_match("return_delivered_order_items", {"item_ids": ["2", "1"]},
                            {"item_ids": ["1", "2"]})
    assert not rules.args_match("book_reservation", {"flights": [{"n": 2}, {"n": 1}]},
                                {"flights": [{"n": 1}, {"n": 2}]})
    # nested records ignore extra keys, top-level arguments do not; 5 == 5.0, "5" != 5
    assert rules.args_match("x", {"f": [{"n": 1, "origin": "EWR"}], "a": 5.0}, {"f": [{"n": 1}], "a": 5})
    assert not rules.args_match("x", {"f": [], "extra": 1}, {"f": []})
    assert not rules.args_match("x", {"a": "5"}, {"a": 5})


def test_reads_text_transfer_rejection_and_cascade():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Your order id?"}]
    msgs += tool_turn("get_user_details", {"user_id": "u"})                       # read not in gold
    msgs += tool_turn("get_order_details", {"order_id": "#W1"})                   # gold read
    msgs += tool_turn("cancel_pending_order", {"order_id": "#W1", "reason": "no longer needed"},
                      result="Error: non-pending order cannot be cancelled")      # rejected write
    msgs += tool_turn("modify_user_address", {"user_id": "u"})                    # unrequested write
    msgs += tool_turn("exchange_delivered_order_items", {**TASK["actions"][1]["kwargs"],
                                                         "payment_method_id": "paypal_2"})
    msgs += tool_turn("transfer_to_human_agents", {"summary": "help"}, "Transfer successful")
    j = rules.judge(TASK, msgs)
    assert j.scores == [0, 0, 1, 0, -1, 0, 0]
    assert "rejected" in j.reasons[3]
    assert j.meta["negative_kind"] == "unrequested_write" and j.meta["cascading"] == [5, 6]
    assert j.meta["offences"] == ["unrequested_write", "wrong_args", "transfer"]
    assert all("cascading" in j.reasons[t] for t in (5, 6))


def test_behaviour_is_measured_by_the_rule_judge_whatever_judge_rewards():
    """score.behaviour: -1 share, needless writes and transfers per tool episode; math
    episodes and episodes without agent turns are left out."""
    from tarl_jax.judge import score

    def episode(msgs, mode="text"):
        turns = [AgentTurn(index=i, message=m)
                 for i, m in enumerate(m for m in msgs if m["role"] == "assistant")]
        return Episode(task_id="t", domain="retail", messages=msgs, turns=turns, mode=mode)

    bad = [{"role": "user", "content": "hi"}]
    bad += tool_turn("modify_user_address", {"user_id": "u"})
    bad += tool_turn("modify_user_address", {"user_id": "v"})
    bad += tool_turn("transfer_to_human_agents", {"summary": "help"}, "Transfer successful")
    good = [{"role": "user", "content": "hi"}] + tool_turn("get_order_details", {"order_id": "#W1"})
    eps = [episode(bad), episode(good), episode(bad, mode="math"), episode([])]
    got = score.behaviour(eps, [TASK] * 4)
    # Over the two tool episodes: bad has 2 needless writes, 1 transfer and a -1; good has a
    # -1 too (the gold exchange is never made).
    assert got == {"behaviour/rule_neg_rate": 1.0, "behaviour/unrequested_writes": 1.0,
                   "behaviour/needless_transfers": 0.5}
    assert score.behaviour([episode([])], [TASK]) == {}


def test_transfer_against_gold_and_rejected_attempt_placement():
    j = rules.judge(TASK, tool_turn("transfer_to_human_agents", {"summary": "x"}))
    assert j.scores == [-1] and j.meta["negative_kind"] == "transfer"
    gold_transfer = dict(TASK, actions=[{"name": "transfer_to_human_agents", "kwargs": {"summary": "y"}}])
    assert rules.judge(gold_transfer, tool_turn("transfer_to_human_agents", {"summary": "x"})).scores == [1]
    # A rejected attempt at a gold write that is never fixed takes the missing-write -1.
    bad = dict(TASK["actions"][1]["kwargs"], order_id="#W9")
    msgs = (tool_turn("exchange_delivered_order_items", bad, "Error: order not found")
            + [{"role": "assistant", "content": "Sorry, bye."}])
    j = rules.judge(TASK, msgs)
    assert j.scores == [-1, 0] and j.meta["negative_kind"] == "missing_write"


def test_required_output_only_counts_when_the_user_sees_it():
    task = dict(TASK, actions=[], outputs=["1234.5"])
    said = [{"role": "assistant", "content": "It costs 1234.5 dollars."}]
    assert rules.judge(task, said).scores == [1]
    beside_call = tool_turn("get_order_details", {"order_id": "#W1"})
    beside_call[0]["content"] = "It costs 1234.5 dollars."
    j = rules.judge(task, beside_call + [{"role": "assistant", "content": "Bye"}])
    assert j.scores == [0, -1] and j.meta["negative_kind"] == "missing_output"


@dataclasses.dataclass
class Action:
    name: str
    kwargs: dict


@dataclasses.dataclass
class Task:
    instruction: str
    actions: list
    outputs: list
    domain: str = "retail"


def test_episode_and_task_objects_judge_like_dicts(retail):
    tasks, refs = retail
    task = tasks[0]
    msgs = gold_dialogue(task, refs[0]["observations"])
    msgs[-2]["tool_calls"][0]["function"]["arguments"] = "{not json"
    obj = Task(task["instruction"], [Action(a["name"], a["kwargs"]) for a in task["actions"]], [])
    turns = [AgentTurn(index=k, message=m) if m["role"] == "assistant" else EnvTurn(m["role"], [m])
             for k, m in enumerate(msgs)]
    ep = Episode(task_id="0", domain="retail", messages=msgs, turns=turns)
    from_dicts = rules.judge(task, msgs)
    assert rules.judge(obj, ep) == from_dicts
    assert from_dicts.scores[-1] == -1 and "not a JSON object" in from_dicts.reasons[-1]
    broken = copy.deepcopy(ep)
    broken.turns = broken.turns[:-2]   # lose the last AgentTurn (and its tool EnvTurn)
    with pytest.raises(ValueError, match="AgentTurns"):
        rules.judge(obj, broken)
