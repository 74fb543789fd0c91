"""Synthetic world and tasks: tau-bench's shapes, gold actions that apply, reproducible seeds,
no overlap with tau-bench; the scripted expert + offline user solve every synthetic task and
every tau-bench v1 test task."""
import collections
import json

import pytest

from tarl_jax.sandbox import domains, synth
from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.env import Env, replay
from tarl_jax.sandbox.episode import run_episode
from tarl_jax.sandbox.tasks import load_tasks
from tarl_jax.sandbox.user import OfflineUser

WRITES = domains.WRITE_TOOLS["retail"]


@pytest.fixture(scope="module")
def synthetic():
    return synth.make_world()


def _keys(records):
    return set().union(*(r.keys() for r in records))


def test_shapes_match_taubench(taubench_dir):
    tables, _ = synth.generate()
    v1 = {t: json.loads((taubench_dir / "v1/retail" / f"{t}.json").read_text())
          for t in ("users", "orders", "products")}
    for table in ("users", "products"):
        assert _keys(tables[table].values()) == _keys(v1[table].values()), table
    base = _keys(v1["orders"].values())
    mine = _keys(tables["orders"].values())
    # tau-bench's write tools add these fields; its initial data has no order in those states.
    assert mine - base == {"return_items", "return_payment_method_id", "exchange_items",
                           "exchange_new_items", "exchange_payment_method_id",
                           "exchange_price_difference"}
    for d in (tables, v1):
        d["items"] = [i for o in d["orders"].values() for i in o["items"]]
        d["variants"] = [v for p in d["products"].values() for v in p["variants"].values()]
    assert _keys(tables["items"]) == _keys(v1["items"])
    assert _keys(tables["variants"]) == _keys(v1["variants"])
    methods = lambda d: collections.defaultdict(set, {  # noqa: E731
        s: {tuple(sorted(m)) for u in d["users"].values() for m in u["payment_methods"].values()
            if m["source"] == s} for s in ("credit_card", "paypal", "gift_card")})
    assert methods(tables) == methods(v1)
    assert set(synth.ORDER_STATUSES) == {o["status"] for o in tables["orders"].values()}


def test_world_is_consistent():
    tables, _ = synth.generate()
    for uid, user in tables["users"].items():
        assert user["orders"] and all(tables["orders"][o]["user_id"] == uid for o in user["orders"])
    ids = [i for p in tables["products"].values() for i in p["variants"]] + list(tables["products"])
    assert len(ids) == len(set(ids))
    names = [(u["name"]["first_name"], u["name"]["last_name"], u["address"]["zip"])
             for u in tables["users"].values()]
    assert len(names) == len(set(names))  # find_user_id_by_name_zip returns the first match


def test_seeded_and_sized():
    small = synth.SynthConfig(seed=7, num_users=10, num_products=5, num_orders=25, num_tasks=30)
    a, b = synth.generate(small), synth.generate(small)
    assert a == b
    tables, tasks = a
    assert [len(tables[t]) for t in ("users", "products", "orders")] == [10, 5, 25]
    assert len(tasks) == 30
    other, _ = synth.generate(synth.SynthConfig(seed=8, num_users=10, num_products=5,
                                                num_orders=25, num_tasks=30))
    assert other["users"] != tables["users"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gold_actions_apply(seed):
    world, tasks = synth.make_world(synth.SynthConfig(seed=seed))
    kinds = collections.Counter(k for t in tasks for k in t.extra["kinds"])
    assert set(kinds) == set(synth.TASK_KINDS)
    for task in tasks:
        env, observations = replay(world, task.actions)
        errors = [o for o in observations if o is None or o.startswith("Error")]
        assert not errors, (task.task_id, errors)
        has_write = any(a.name in WRITES for a in task.actions)
        assert bool(env.db.dirty()) == has_write, task.task_id
        assert has_write or task.outputs or "other_user" in task.extra["kinds"], task.task_id


def test_other_users_order_must_be_declined(synthetic):
    world, tasks = synthetic
    task = next(t for t in tasks if t.extra["kinds"] == ["other_user"])
    oid = task.actions[-1].kwargs["order_id"]
    assert json.loads(world.initial_text("orders", oid))["user_id"] != task.user_id
    for comply, reward in ((False, 1.0), (True, 0.0)):
        env = Env(world, task)
        for a in task.actions:
            env.call(a.name, a.kwargs)
        if comply:  # the tools allow it; only the policy forbids it
            out = env.call("cancel_pending_order", {"order_id": oid, "reason": "no longer needed"})
            assert not out.startswith("Error")
        assert env.reward([task.extra["answer"]])[0] == reward


def test_no_overlap_with_taubench(taubench_dir):
    tables, tasks = synth.generate()
    theirs = set(json.loads((taubench_dir / "v1/retail/users.json").read_text()))
    for split in ("test", "dev", "train"):
        theirs |= {t["user_id"] for t in json.loads(
            (taubench_dir / f"v1/retail/tasks_{split}.json").read_text())}
    mine = {t.user_id for t in tasks} | set(tables["users"])
    assert not mine & theirs
    assert all(t.task_id.startswith("synth-") for t in tasks)


def test_write_json_roundtrip(tmp_path):
    tables, tasks = synth.generate(synth.SynthConfig(num_tasks=5))
    synth.write_json(tmp_path, tables, tasks)
    world = World.from_dir("retail", tmp_path)
    assert world.policy == synth.POLICY
    loaded = load_tasks(tmp_path / "tasks.json", "retail")
    assert [t.actions for t in loaded] == [t.actions for t in tasks]


def _solve(world, tasks):
    results = {}
    for task in tasks:
        ep = run_episode(Env(world, task), task, synth.ExpertAgent(task), OfflineUser(task, world))
        results[task.task_id] = (ep.reward, ep.termination)
    return results


def test_expert_and_offline_user_solve_synthetic(synthetic):
    world, tasks = synthetic
    results = _solve(world, tasks)
    assert {r for r, _ in results.values()} == {1.0}, [k for k, v in results.items() if v[0] != 1]


@pytest.mark.parametrize("domain,count", [("retail", 115), ("airline", 50)])
def test_expert_and_offline_user_solve_taubench(taubench_dir, domain, count):
    world = World.from_dir(domain, taubench_dir / "v1" / domain)
    tasks = load_tasks(taubench_dir / "v1" / domain / "tasks_test.json", domain)
    assert len(tasks) == count
    results = _solve(world, tasks)
    failed = {k: v for k, v in results.items() if v[0] != 1.0}
    assert not failed
    ends = collections.Counter(t for _, t in results.values())
    transfers = sum(any(a.name == "transfer_to_human_agents" for a in t.actions) for t in tasks)
    assert ends["transfer"] == transfers and ends["user_stop"] == count - transfers


def test_expert_dialogue_is_natural(synthetic):
    world, tasks = synthetic
    task = next(t for t in tasks if t.extra["kinds"] == ["cancel"])
    ep = run_episode(Env(world, task), task, synth.ExpertAgent(task), OfflineUser(task, world))
    said = [m for m in ep.messages if m["role"] == "assistant"]
    assert "verify your identity" in said[0]["content"]
    write = next(i for i, m in enumerate(said) if m.get("tool_calls")
                 and m["tool_calls"][0]["function"]["name"] == "cancel_pending_order")
    assert "(yes/no)" in said[write - 1]["content"]     # stated and confirmed before the write
    assert ep.messages[-1]["content"] == "###STOP###"
    assert all(len(m.get("tool_calls") or []) <= 1 for m in said)  # one call per message


def test_expert_reports_failed_gold_write(synthetic):
    world, tasks = synthetic
    task = synth.Task("bad", "retail", tasks[0].user_id, "", [synth.Action(
        "cancel_pending_order", {"order_id": "#W0", "reason": "ordered by mistake"})], [])
    ep = run_episode(Env(world, task), task, synth.ExpertAgent(task), OfflineUser(task, world))
    assert ep.reward == 1.0  # the gold replay fails the same way
    closing = [m["content"] for m in ep.messages if m["role"] == "assistant" and m["content"]][-1]
    assert "unable to cancel order #W0" in closing and "order not found" in closing


def test_expert_writes_only_after_yes(synthetic):
    world, tasks = synthetic
    task = next(t for t in tasks if t.extra["kinds"] == ["cancel"])

    class Refuser(OfflineUser):
        def reply(self, messages):
            text = super().reply(messages)
            return "No, I changed my mind." if text.startswith("Yes") else text

    ep = run_episode(Env(world, task), task, synth.ExpertAgent(task), Refuser(task, world))
    calls = [m["tool_calls"][0]["function"]["name"] for m in ep.messages if m.get("tool_calls")]
    assert "cancel_pending_order" not in calls and ep.reward == 0.0
    assert any("did not cancel order" in (m["content"] or "") for m in ep.messages
               if m["role"] == "assistant")


def test_split_holds_out_new_request_combinations():
    _, tasks = synth.generate(synth.SynthConfig(level=0, num_users=60, num_orders=200,
                                                num_tasks=150))
    parts = synth.split(tasks, test=40, validation=20)
    assert parts["test"] == tasks[-40:] and parts["validation"] == tasks[-60:-40]
    ids = {k: {t.task_id for t in v} for k, v in parts.items()}
    assert not ids["train"] & (ids["test"] | ids["validation"])
    held = set().union(*(synth.write_targets(t) for t in parts["test"] + parts["validation"]))
    assert held and all(synth.write_targets(t) for t in tasks)   # every task writes something
    assert not any(synth.write_targets(t) & held for t in parts["train"])
    # the filter did bite: some earlier tasks wrote a held-out record and are gone
    assert 0 < len(tasks) - 60 - len(parts["train"]) < 90
    with pytest.raises(ValueError, match="leave none"):
        synth.split(tasks, 100, 50)


@pytest.mark.parametrize("level", [0, 1])
def test_lower_levels_keep_the_real_tools_and_outcome(level):
    """Every level's tasks are solved by the expert through the real tools, with a real write
    whose arguments the dialogue or a tool result carries; level 0 is one cancellation whose
    arguments the user states, with short ids."""
    world, tasks = synth.make_world(synth.SynthConfig(level=level, num_tasks=30))
    results = _solve(world, tasks)
    assert {r for r, _ in results.values()} == {1.0}
    writes = [[a for a in t.actions if a.name in domains.WRITE_TOOLS["retail"]] for t in tasks]
    assert all(len(w) == 1 for w in writes)
    if level == 0:
        assert {w[0].name for w in writes} == {"cancel_pending_order"}
        assert all(len(t.actions) == 1 and len(w[0].kwargs["order_id"]) == 6
                   for t, w in zip(tasks, writes))    # "#W" + 4 digits
    else:
        assert len({w[0].name for w in writes}) >= 3
        assert all(t.actions[0].name.startswith("get_") for t in tasks)   # looked up first
    with pytest.raises(ValueError, match="level=7"):
        synth.generate(synth.SynthConfig(level=7))


@pytest.mark.parametrize("level", ["0", "1", "1,compact", "2"])
def test_every_argument_the_expert_passes_is_in_what_the_agent_saw_before(level):
    """A policy imitates the expert from the dialogue alone: every id or value the expert
    passes to a tool is written earlier in the agent's context (system prompt, user turns,
    tool results). (Level 1's user id was not: the signed-in session never named it, and the
    expert's first call read the user's record by an id the policy could only guess.)"""
    from tarl_jax import components, configlib

    c = configlib.load("configs/tiny.py", f"level={level}")
    c.world.synth.update(num_tasks=60)
    c.world.update(eval_tasks=5, val_tasks=5)
    world = components.build_world(c)
    unseen, results = [], []
    for task in world.train[:40]:
        ep = world.run_one(task, synth.ExpertAgent(task), 30)
        assert ep.reward == 1.0, task.task_id
        results += [m["content"] for m in ep.messages if m["role"] == "tool"]
        for k, m in enumerate(ep.messages):
            seen = " ".join(str(p.get("content") or "") for p in ep.messages[:k])
            for call in m.get("tool_calls") or ():
                args = json.loads(call["function"]["arguments"])
                for name, value in args.items():
                    for v in value if isinstance(value, list) else [value]:
                        if isinstance(v, str) and v not in seen:
                            unseen.append((task.task_id, call["function"]["name"], name, v))
    assert not unseen, unseen[:5]
    # (the compact world did show compact records: no prices, no addresses)
    assert any('"price"' in r for r in results) == ("compact" not in level)


def test_compact_results_show_the_same_records_shorter():
    """world.result_view=compact changes only what the agent reads: the expert makes the same
    calls with the same arguments, reaches the same database, and each result it read is
    compact_result of the full one, keeping every id (order, items, payment methods, orders)."""
    from tarl_jax import components, configlib

    worlds = {}
    for arg in ("level=1", "level=1,compact"):
        c = configlib.load("configs/tiny.py", arg)
        c.world.synth.update(num_tasks=40, num_orders=1000, num_users=200)   # one database
        c.world.update(eval_tasks=4, val_tasks=4)
        worlds[arg] = components.build_world(c)
    full, compact = worlds["level=1"], worlds["level=1,compact"]
    chars = {"full": 0, "compact": 0}
    for task in full.train[:20]:
        a = full.run_one(task, synth.ExpertAgent(task), 30)
        b = compact.run_one(task, synth.ExpertAgent(task), 30)
        assert a.reward == b.reward == 1.0
        calls = [[(c["function"]["name"], c["function"]["arguments"])
                  for m in ep.messages for c in m.get("tool_calls") or ()] for ep in (a, b)]
        assert calls[0] == calls[1]
        tools = [[m["content"] for m in ep.messages if m["role"] == "tool"] for ep in (a, b)]
        assert [synth.compact_result(r) for r in tools[0]] == tools[1]
        for long, short in zip(*tools):
            f, c = json.loads(long), json.loads(short)
            assert {k: f[k] for k in ("order_id", "status", "orders") if k in f} == \
                   {k: c[k] for k in ("order_id", "status", "orders") if k in c}
            assert [(i["item_id"], i["name"]) for i in f.get("items", [])] == \
                   [(i["item_id"], i["name"]) for i in c.get("items", [])]
            assert [p["payment_method_id"] for p in f.get("payment_history", [])
                    if p["transaction_type"] == "payment"] == c.get("paid_with", [])
            assert set(f.get("payment_methods", {})) == set(c.get("payment_methods", {}))
            chars["full"] += len(long)
            chars["compact"] += len(short)
    assert chars["compact"] < 0.5 * chars["full"], chars
    for text in ("Error: order not found", "", "done", "[1, 2]"):
        assert synth.compact_result(text) == text
