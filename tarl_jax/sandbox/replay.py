"""Replay each task's gold actions on a fresh database and write what they produced.

    python -m tarl_jax.sandbox.replay --domain retail --tasks TASKS.json --data DIR --out OUT.jsonl

One JSON line per task, in the format of the shared reference files: v1 (`DIR` holds
users.json ...) gives {task, observations, final_diff, drop_last_write} like
v1/reference/*.jsonl; tau2 (`DIR` holds db.json) gives {task_id, observations: [{content,
error}], final_diff} like tau2/reference/*.jsonl. `final_diff` lists, per table, the records
that differ from the initial database; `drop_last_write` replays without the last write action
and says whether tau-bench's database check would still pass.
"""
from __future__ import annotations

import argparse
import json

from tarl_jax.sandbox import reward as rw
from tarl_jax.sandbox.db import Db, World
from tarl_jax.sandbox.env import replay
from tarl_jax.sandbox.tasks import Task, load_tasks


def final_diff(world: World, db: Db) -> dict:
    diff: dict = {}
    for (table, key), text in db.dirty().items():
        if rw.canonical(text) != rw.canonical(world.initial_text(table, key)):
            # No tool deletes a record, so "removed" is always empty.
            entry = diff.setdefault(table, {"changed": {}, "removed": []})
            entry["changed"][key] = json.loads(text)
    return diff


def replay_task(world: World, task: Task) -> dict:
    env, observations = replay(world, task.actions)
    if world.flavor == "tau2":
        return {"task_id": task.task_id, "final_diff": final_diff(world, env.db),
                "observations": [{"content": "" if o is None else o,
                                  "error": isinstance(o, str) and o.startswith("Error")}
                                 for o in observations]}
    line = {"task": int(task.task_id), "observations": observations,
            "final_diff": final_diff(world, env.db)}
    writes = [i for i, a in enumerate(task.actions) if a.name in world.spec.write_tools]
    if writes:
        dropped, _ = replay(world, task.actions[:writes[-1]] + task.actions[writes[-1] + 1:])
        line["drop_last_write"] = {
            "dropped_index": writes[-1], "final_diff": final_diff(world, dropped.db),
            "db_match": rw.same_state(world.initial_text, dropped.db.dirty(), env.db.dirty())}
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", required=True, choices=["retail", "airline"])
    parser.add_argument("--tasks", required=True, help="tasks JSON (v1 list or tau2 tasks.json)")
    parser.add_argument("--data", required=True, help="domain data directory")
    parser.add_argument("--out", required=True, help="output JSONL")
    args = parser.parse_args(argv)
    world = World.from_dir(args.domain, args.data)
    with open(args.out, "w") as f:
        for task in load_tasks(args.tasks, args.domain):
            f.write(json.dumps(replay_task(world, task), sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
