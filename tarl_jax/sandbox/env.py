"""One episode's sandbox: tools on an isolated database fork, and its outcome reward.

`Env.call` never raises. Like tau-bench it answers an exception inside a tool with
"Error: {e}" and an unknown tool name with "Unknown action {name}" (tau2 worlds: "Error: Tool
'{name}' not found."); unlike tau-bench (which would crash or hang) it also answers malformed
arguments, oversized payloads and calculator time bombs with an "Error: ..." string. A call
that fails leaves the database as it was.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from tarl_jax.sandbox import reward as rw
from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.tasks import Task

MAX_ARGUMENT_CHARS = 100_000  # real calls are a few hundred characters


@dataclasses.dataclass
class Call:
    name: str
    kwargs: dict | None          # None when the arguments could not be parsed
    observation: str | None

    @property
    def ok(self) -> bool:
        return self.kwargs is not None and not (
            isinstance(self.observation, str) and self.observation.startswith("Error"))


def _parse(arguments: Any) -> dict:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, (str, bytes)):
        if len(arguments) > MAX_ARGUMENT_CHARS:
            raise ValueError(f"arguments longer than {MAX_ARGUMENT_CHARS} characters")
        arguments = json.loads(arguments)
    elif len(json.dumps(arguments)) > MAX_ARGUMENT_CHARS:
        raise ValueError(f"arguments longer than {MAX_ARGUMENT_CHARS} characters")
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object, not {type(arguments).__name__}")
    return arguments


class Env:
    def __init__(self, world: World, task: Task | None = None):
        self.world, self.task = world, task
        self.spec = world.spec
        self.db = world.fork()
        self.tools: list[dict] = self.spec.schemas
        self.policy: str = world.policy
        # What the agent reads of a tool's answer (synth.RESULT_VIEWS); None: the answer itself.
        self.present: Callable[[str], str] | None = None
        self.done = False
        self.calls: list[Call] = []

    def execute(self, name: Any, arguments: Any) -> str | None:
        """The tool's raw answer (tau-bench's observation; `None` where its tool returns none)."""
        name = name if isinstance(name, str) else str(name)
        try:
            kwargs = _parse(arguments)
        except Exception as e:  # noqa: BLE001 - any malformed input becomes an error string
            out = f"Error: invalid arguments: {e}"
            self.calls.append(Call(name, None, out))
            return out
        fn = self.spec.tools.get(name)
        if fn is None:
            out = self.spec.unknown_tool.format(name=name)
        else:
            try:
                if name in self.spec.write_tools:
                    with self.db.atomic():
                        out = fn(self.db, **kwargs)
                else:  # only write tools write: skip the savepoint
                    out = fn(self.db, **kwargs)
            except Exception as e:  # noqa: BLE001 - tau-bench's rule: the exception text
                out = f"Error: {e}"
            self.done = self.done or name in self.spec.terminate_tools
        self.calls.append(Call(name, kwargs, out))
        return out

    def call(self, name: Any, arguments: Any) -> str:
        """The tool's answer as a string ("" where tau-bench's is None: `send_certificate` for
        a user who already holds its three certificate ids)."""
        out = self.execute(name, arguments)
        out = "" if out is None else out
        return self.present(out) if self.present else out

    def written_calls(self) -> list[str]:
        """Canonical strings of the write calls that took effect."""
        return [rw.canonical_call(c.name, c.kwargs) for c in self.calls
                if c.ok and c.name in self.spec.write_tools]

    def reward(self, outputs_said: list[str] | None = None,
               variant: str = "taubench") -> tuple[float, dict]:
        """tau-bench's outcome ("taubench": database equals the gold replay's, and every
        required output was said) or TARL's ("tarl": effective write calls equal gold's)."""
        if self.task is None:
            raise ValueError("reward needs the Env to have a task")
        gold = gold_state(self.world, self.task)
        if variant == "tarl":
            ok, info = rw.writes_match(self.written_calls(), gold.writes)
            return float(ok), {"variant": variant, "r_writes": ok, **info}
        if variant != "taubench":
            raise ValueError(f"unknown reward variant {variant!r} (taubench | tarl)")
        r_actions = rw.same_state(self.world.initial_text, self.db.dirty(), gold.records)
        info = {"variant": variant, "r_actions": r_actions}
        ok = r_actions
        if self.task.outputs:
            found = rw.outputs_found(self.task.outputs, outputs_said or [])
            info.update(r_outputs=float(all(found.values())), outputs=found)
            ok = ok and all(found.values())
        return float(ok), info


@dataclasses.dataclass(frozen=True)
class GoldState:
    records: dict[tuple[str, str], str]   # records the gold replay wrote
    observations: list[str | None]
    writes: list[str]                     # canonical effective write calls


def replay(world: World, actions) -> tuple[Env, list[str | None]]:
    """A fresh Env after running `actions`, and their observations. As in tau-bench's reward
    replay, the transfer tool is skipped in v1 worlds (observation None); tau2 runs it."""
    env = Env(world)
    skip = world.spec.terminate_tools if world.flavor == "v1" else frozenset()
    observations = [None if a.name in skip else env.execute(a.name, a.kwargs) for a in actions]
    return env, observations


def gold_state(world: World, task: Task) -> GoldState:
    """The gold replay's outcome, computed once per task and world (replays are deterministic)."""
    key = json.dumps([[a.name, a.kwargs] for a in task.actions], sort_keys=True)
    if key not in world.gold_cache:
        env, observations = replay(world, task.actions)
        world.gold_cache[key] = GoldState(env.db.dirty(), observations, env.written_calls())
    return world.gold_cache[key]
