"""Conformance with tau2-bench: gold replays against tau2/reference/*.jsonl and tau2's
changed tool behaviour."""
import json

import pytest

from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.replay import replay_task
from tarl_jax.sandbox.tasks import load_tasks


@pytest.fixture(scope="module")
def tau2(taubench_dir):
    out = {}
    for domain in ("retail", "airline"):
        path = taubench_dir / "tau2" / domain
        out[domain] = (World.from_dir(domain, path), load_tasks(path / "tasks.json", domain))
    return out


@pytest.mark.parametrize("domain", ["retail", "airline"])
def test_gold_replay_matches_reference(taubench_dir, tau2, domain):
    world, tasks = tau2[domain]
    assert world.flavor == "tau2"
    by_id = {t.task_id: t for t in tasks}
    lines = (taubench_dir / "tau2" / "reference" / f"{domain}.jsonl").read_text().splitlines()
    assert len(lines) == len(tasks)
    n_errors = 0  # the gold actions that fail (and must change nothing)
    for line in lines:
        ref = json.loads(line)
        task = by_id[ref["task_id"]]
        got = replay_task(world, task)
        assert got["observations"] == ref["observations"], task.task_id
        assert json.dumps(got, sort_keys=True) == json.dumps(ref, sort_keys=True), task.task_id
        n_errors += sum(o["error"] for o in ref["observations"])
        env = Env(world, task)
        for a in task.actions:
            env.call(a.name, a.kwargs)
        assert env.reward(task.outputs)[0] == 1.0, task.task_id
        assert env.reward(variant="tarl")[0] == 1.0, task.task_id
    assert n_errors == {"retail": 18, "airline": 0}[domain]


@pytest.mark.parametrize("domain", ["retail", "airline"])
def test_schemas(taubench_dir, tau2, domain):
    spec = tau2[domain][0].spec
    assert [s["function"]["name"] for s in spec.schemas] == list(spec.tools)
    v1 = {s["function"]["name"]: s
          for s in json.loads((taubench_dir / "v1" / domain / "tools.json").read_text())}
    shared = [s for s in spec.schemas if s["function"]["name"] in v1]
    assert len(shared) == len(spec.schemas) - 1  # tau2 adds one tool, drops `think`
    assert all(s == v1[s["function"]["name"]] for s in shared)
    assert "think" not in spec.tools and spec.write_tools <= set(spec.tools)


def test_tau2_tool_changes(tau2):
    world, _ = tau2["airline"]
    env = Env(world)
    assert env.call("get_flight_status", {"flight_number": "HAT001", "date": "2024-05-03"}) \
        == "cancelled"
    assert env.call("think", {"thought": "x"}) == "Error: Tool 'think' not found."
    assert env.call("get_user_details", {"user_id": "nobody"}) == "Error: User nobody not found"
    flights = json.loads(env.call("search_direct_flight",
                                  {"origin": "JFK", "destination": "SEA", "date": "2024-05-20"}))
    first = flights[0]
    assert list(first)[:4] == ["flight_number", "origin", "destination", "status"]
    seats = first["available_seats"]["economy"]
    user = json.loads(env.call("get_user_details", {"user_id": "mia_li_3668"}))
    card = next(k for k, m in user["payment_methods"].items() if m["source"] == "credit_card")
    booking = {"user_id": "mia_li_3668", "origin": "JFK", "destination": "SEA",
               "flight_type": "one_way", "cabin": "economy",
               "flights": [{"flight_number": first["flight_number"], "date": "2024-05-20"}],
               "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
               "payment_methods": [{"payment_id": card, "amount": first["prices"]["economy"]}],
               "total_baggages": 0, "nonfree_baggages": 0, "insurance": "no"}
    reservation = json.loads(env.call("book_reservation", booking))
    assert reservation["status"] is None and reservation["reservation_id"] == "HATHAT"
    after = json.loads(env.call("search_direct_flight",
                                {"origin": "JFK", "destination": "SEA", "date": "2024-05-20"}))
    assert after[0]["available_seats"]["economy"] == seats - 1  # tau2 booking takes a seat
    assert Env(world).db.get("flights", first["flight_number"]) != env.db.get(
        "flights", first["flight_number"])
    bad = dict(booking, cabin="first")
    assert env.call("book_reservation", bad).startswith("Error: Reservation.cabin: expected one")

    world, _ = tau2["retail"]
    env = Env(world)
    item = json.loads(env.call("get_item_details", {"item_id": "1151293680"}))
    assert list(item) == ["item_id", "options", "available", "price"]
    assert env.call("get_item_details", {"item_id": "0"}) == "Error: Item not found"
    assert env.call("cancel_pending_order", {"order_id": "#W0"}) == (
        "Error: RetailTools.cancel_pending_order() missing 1 required positional argument: "
        "'reason'")


def test_replay_cli_writes_the_reference_bytes(taubench_dir, tmp_path):
    from tarl_jax.sandbox import replay as cli
    tasks = json.loads((taubench_dir / "tau2/retail/tasks.json").read_text())[:10]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    out = tmp_path / "retail.jsonl"
    cli.main(["--domain", "retail", "--tasks", str(tmp_path / "tasks.json"),
              "--data", str(taubench_dir / "tau2/retail"), "--out", str(out)])
    reference = (taubench_dir / "tau2/reference/retail.jsonl").read_bytes()
    assert out.read_bytes() == b"".join(reference.splitlines(keepends=True)[:10])


def test_tau2_tasks_load(tau2):
    _, tasks = tau2["airline"]
    task = tasks[0]
    assert (task.task_id, task.user_id, task.actions) == ("0", "emma_kim_9957", [])
    assert task.instruction.startswith("Domain: airline\nReason for call:\n\tYou want to cancel")
    _, tasks = tau2["retail"]
    assert tasks[0].actions[0].name == "find_user_id_by_name_zip" and tasks[0].outputs == []
