"""Env robustness and semantics: error strings, atomicity, isolation between concurrent
episodes, reward variants, pass^k, and a fuzz of hostile tool calls."""
import json
import math
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tarl_jax.sandbox import reward as rw
from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.env import MAX_ARGUMENT_CHARS, Env
from tarl_jax.sandbox.tasks import Action, Task, load_tasks

PRODUCT = {"name": "Lamp", "product_id": "p1", "variants": {
    "i1": {"item_id": "i1", "options": {"color": "red"}, "available": True, "price": 10.5},
    "i2": {"item_id": "i2", "options": {"color": "blue"}, "available": True, "price": 12.25},
    "i3": {"item_id": "i3", "options": {"color": "green"}, "available": False, "price": 9.0}}}
ADDRESS = {"address1": "1 Main St", "address2": "", "city": "Austin", "country": "USA",
           "state": "TX", "zip": "78701"}
USER = {"user_id": "ann_1", "name": {"first_name": "Ann", "last_name": "Lee"},
        "address": ADDRESS, "email": "Ann@x.com",
        "payment_methods": {
            "gift_card_1": {"source": "gift_card", "balance": 5.0, "id": "gift_card_1"},
            "credit_card_1": {"source": "credit_card", "brand": "visa", "last_four": "1234",
                              "id": "credit_card_1"}},
        "orders": ["#W1", "#W2"]}


def _order(order_id, status):
    return {"order_id": order_id, "user_id": "ann_1", "address": ADDRESS,
            "items": [{"name": "Lamp", "product_id": "p1", "item_id": "i1", "price": 10.5,
                       "options": {"color": "red"}}],
            "fulfillments": [], "status": status,
            "payment_history": [{"transaction_type": "payment", "amount": 10.5,
                                 "payment_method_id": "gift_card_1"}]}


@pytest.fixture(scope="module")
def tiny():
    return World.from_tables("retail", {
        "users": {"ann_1": USER}, "products": {"p1": PRODUCT},
        "orders": {"#W1": _order("#W1", "pending"), "#W2": _order("#W2", "delivered")}})


def test_tool_errors_read_like_tau_bench(tiny):
    env = Env(tiny)
    assert env.call("get_order_details", {"order_id": "#W9"}) == "Error: order not found"
    assert env.call("get_order_details", {"order_id": ["#W1"]}) == \
        "Error: unhashable type: 'list'"
    assert env.call("cancel_pending_order", {"order_id": "#W1"}) == (
        "Error: CancelPendingOrder.invoke() missing 1 required positional argument: 'reason'")
    assert env.call("get_user_details", {"user_id": "ann_1", "x": 1}) == (
        "Error: GetUserDetails.invoke() got an unexpected keyword argument 'x'")
    assert env.call("fly", {}) == "Unknown action fly"
    assert env.call("find_user_id_by_email", {"email": "ANN@X.COM"}) == "ann_1"
    assert env.call("find_user_id_by_name_zip",
                    {"first_name": "ann", "last_name": "LEE", "zip": "78701"}) == "ann_1"
    assert env.call("find_user_id_by_email", {"email": 3}) == \
        "Error: 'int' object has no attribute 'lower'"
    assert env.call("get_order_details", '{"order_id": ') .startswith("Error: invalid arguments")
    assert env.call("get_order_details", "[1]") == \
        "Error: invalid arguments: arguments must be a JSON object, not list"
    assert env.call("list_all_product_types", "") == '{"Lamp": "p1"}'
    assert env.call("think", {"thought": "hm"}) == ""
    assert not env.done and env.call("transfer_to_human_agents", {"summary": "s"}) and env.done
    assert env.db.dirty() == {}


def test_calculator_matches_python_and_survives_time_bombs(tiny):
    env = Env(tiny)
    for expr in ["2 + 2", "(1.5 * 3) / 7", "-(2 ** 10) // 3", "10 / 4 - 0.125"]:
        assert env.call("calculate", {"expression": expr}) == \
            str(round(float(eval(expr, {"__builtins__": None}, {})), 2))
    assert env.call("calculate", {"expression": "1 / 0"}) == "Error: division by zero"
    assert env.call("calculate", {"expression": "1 +"}) == \
        "Error: invalid syntax (<string>, line 1)"
    assert env.call("calculate", {"expression": "__import__('os')"}) == \
        "Error: invalid characters in expression"
    assert env.call("calculate", {"expression": "9**9**9**9"}) == \
        "Error: int too large to convert to float"
    assert env.call("calculate", {"expression": "1 ** 99999999999"}) == "1.0"


def test_failed_call_changes_nothing(tiny):
    env = Env(tiny)
    # Passes every check, then fails while building the answer: all writes must be undone.
    bad = {"order_id": "#W1", "item_ids": ["i1"], "new_item_ids": ["i2"],
           "payment_method_id": "credit_card_1"}
    assert json.loads(env.call("modify_pending_order_items", bad))["status"] == \
        "pending (item modified)"
    env2 = Env(tiny)
    with pytest.raises(ZeroDivisionError):
        with env2.db.atomic():
            env2.db.put("orders", "#W1", {"order_id": "#W1", "status": "gone"})
            1 / 0
    assert env2.db.dirty() == {} and env2.db.get("orders", "#W1")["status"] == "pending"


def test_write_effects_and_key_order(tiny):
    env = Env(tiny)
    out = env.call("cancel_pending_order", {"order_id": "#W1", "reason": "no longer needed"})
    order = json.loads(out)
    assert list(order)[-1] == "cancel_reason" and order["status"] == "cancelled"
    assert order["payment_history"][-1] == {"transaction_type": "refund", "amount": 10.5,
                                            "payment_method_id": "gift_card_1"}
    assert env.db.get("users", "ann_1")["payment_methods"]["gift_card_1"]["balance"] == 15.5
    assert env.call("cancel_pending_order", {"order_id": "#W1", "reason": "no longer needed"}) \
        == "Error: non-pending order cannot be cancelled"
    assert Env(tiny).db.get("orders", "#W1")["status"] == "pending"  # the template is untouched


def test_reward_variants(tiny):
    gold = [Action("return_delivered_order_items",
                   {"order_id": "#W2", "item_ids": ["i1"], "payment_method_id": "gift_card_1"})]
    task = Task("t", "retail", "ann_1", "return it", gold, ["10.5"])
    env = Env(tiny, task)
    assert env.reward(["ok"]) == (0.0, {"variant": "taubench", "r_actions": False,
                                        "r_outputs": 0.0, "outputs": {"10.5": False}})
    env.call("return_delivered_order_items", {"payment_method_id": "gift_card_1",
                                              "order_id": "#W2", "item_ids": ["i1"]})
    assert env.reward(["You get 10.5 back"])[0] == 1.0
    assert env.reward(variant="tarl")[0] == 1.0  # argument order is irrelevant
    env.call("modify_user_address", {"user_id": "ann_1", **ADDRESS})  # same values: db equal
    assert env.reward(["10.5"])[0] == 1.0
    reward, info = env.reward(variant="tarl")  # but an extra effective write for TARL
    assert reward == 0.0 and len(info["extra"]) == 1 and info["missing"] == []
    env = Env(tiny, task)  # a rejected write neither changes the db nor counts for TARL
    assert env.call("return_delivered_order_items", {
        "order_id": "#W2", "item_ids": ["i1"], "payment_method_id": "credit_card_1"}) == (
        "Error: payment method should be either the original payment method or a gift card")
    env.call("return_delivered_order_items",
             {"order_id": "#W2", "item_ids": ["i1"], "payment_method_id": "gift_card_1"})
    assert env.reward(["10.5"])[0] == 1.0 and env.reward(variant="tarl")[0] == 1.0
    env.call("modify_user_address", {"user_id": "ann_1", **ADDRESS, "zip": "78702"})
    assert env.reward(["10.5"])[0] == 0.0 and env.reward(variant="tarl")[0] == 0.0


def test_outputs_check_rules():
    found = rw.outputs_found(["1,000", "Blue"], ["it costs 1,000 dollars", "BLUE one"])
    assert found == {"1,000": False, "Blue": True}  # commas are removed from messages only
    assert rw.outputs_found(["1000"], ["it costs 1,000 dollars"]) == {"1000": True}


def test_same_state_distinguishes_like_the_hash():
    initial = {("t", "a"): '{"x": 1, "y": [1, 2]}'}.get
    same = rw.same_state(lambda *k: initial(k), {("t", "a"): '{"y": [1, 2], "x": 1}'}, {})
    assert same
    for text in ['{"x": 1.0, "y": [1, 2]}', '{"x": 1, "y": [2, 1]}', '{"x": true, "y": [1, 2]}']:
        assert not rw.same_state(lambda *k: initial(k), {("t", "a"): text}, {})


def test_pass_hat_k():
    trials = {"a": [1.0, 1.0, 0.0, 1.0], "b": [0.0, 0.0, 0.0, 1.0]}
    assert rw.pass_hat_k(trials, 1) == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert rw.pass_hat_k(trials, 2) == pytest.approx((math.comb(3, 2) / 6 + 0) / 2)
    assert rw.pass_hat_k(trials, 4) == 0.0
    with pytest.raises(ValueError):
        rw.pass_hat_k(trials, 5)


@pytest.fixture(scope="module")
def real(taubench_dir):
    return {(d, f): World.from_dir(d, taubench_dir / ("v1" if f == "v1" else "tau2") / d)
            for d in ("retail", "airline") for f in ("v1", "tau2")}


def test_concurrent_episodes_are_isolated(real, taubench_dir):
    """Threads replay different tasks at once; each sees only its own writes."""
    world = real["retail", "v1"]
    tasks = load_tasks(taubench_dir / "v1" / "retail" / "tasks_test.json", "retail")
    chosen = [t for t in tasks if any(a.name in world.spec.write_tools for a in t.actions)][:8]
    barrier, results = threading.Barrier(len(chosen)), {}

    def run(task):
        env = Env(world, task)
        barrier.wait()
        for a in task.actions:
            env.call(a.name, a.kwargs)
        results[task.task_id] = env.reward(task.outputs)[0]

    threads = [threading.Thread(target=run, args=(t,)) for t in chosen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {t.task_id: 1.0 for t in chosen}

    a, b = Env(world), Env(world)
    order = next(k for k, o in a.db.scan("orders", status="pending"))
    before = b.call("get_order_details", {"order_id": order})
    a.call("cancel_pending_order", {"order_id": order, "reason": "no longer needed"})
    assert b.call("get_order_details", {"order_id": order}) == before
    assert json.loads(a.call("get_order_details", {"order_id": order}))["status"] == "cancelled"


_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_json = _scalar | st.lists(_scalar, max_size=3) | st.dictionaries(st.text(max_size=6), _scalar,
                                                                  max_size=2)


def _hostile_calls(world):
    """Calls every one of which tau-bench must reject: unknown tools, broken or non-object
    JSON, oversized payloads, missing or unexpected arguments, unhashable record ids."""
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in world.spec.schemas}
    names = sorted(schemas)
    ids = {"order_id", "user_id", "reservation_id"}

    @st.composite
    def full_args(draw, name):
        return {p: draw(_json) for p in schemas[name]["properties"]}

    @st.composite
    def missing(draw):
        name = draw(st.sampled_from([n for n in names if schemas[n]["required"]]))
        args = draw(full_args(name))
        del args[draw(st.sampled_from(schemas[name]["required"]))]
        return name, args

    @st.composite
    def unexpected(draw):
        name = draw(st.sampled_from(names))
        args = draw(full_args(name))
        args[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in args))] = 1
        return name, args

    @st.composite
    def unhashable_id(draw):
        name = draw(st.sampled_from(sorted(world.spec.write_tools)))
        args = draw(full_args(name))
        key = schemas[name]["required"][0]
        assert key in ids
        args[key] = draw(st.lists(_json, max_size=2) | st.dictionaries(st.text(max_size=3), _json,
                                                                       max_size=2))
        return name, args

    unknown = st.tuples(st.text(max_size=30).filter(lambda n: n not in schemas), _json)
    broken = st.tuples(st.sampled_from(names),
                       st.text(min_size=1, max_size=40).filter(_not_json_object))
    huge = st.tuples(st.sampled_from(names), st.just(
        json.dumps({"expression": "1+" * (MAX_ARGUMENT_CHARS // 2)})))
    return unknown | broken | huge | missing() | unexpected() | unhashable_id()


def _not_json_object(text):
    try:
        return not isinstance(json.loads(text), dict)
    except ValueError:
        return True


@pytest.mark.parametrize("domain", ["retail", "airline"])
@pytest.mark.parametrize("flavor", ["v1", "tau2"])
def test_fuzz_hostile_calls_change_nothing(real, domain, flavor):
    world = real[domain, flavor]
    env = Env(world)

    sizes = []

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_hostile_calls(world), min_size=5, max_size=10))
    def check(calls):
        for call in calls:
            out = env.call(*call)
            assert isinstance(out, str) and out.startswith(("Error", "Unknown action")), call
            assert env.db.dirty() == {}, call
        sizes.append(len(calls))

    check()
    # The whole budget ran: 100 examples of 5-10 calls (how many of each varies between
    # environments: 583 to 756 calls were seen; a bound on the sum was flaky).
    assert len(sizes) >= 100 and sum(sizes) >= 500, (len(sizes), sum(sizes))
    assert json.dumps(env.db.export()) == json.dumps(world.fork().export())
