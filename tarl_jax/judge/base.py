"""What every judge shares: the verdict type and the views of a task and of a dialogue.

A judge reads `(task, dialogue)`:
- `task`: anything with `.instruction`, `.actions` (gold calls: objects with `.name`/`.kwargs`
  or dicts `{name, kwargs}`), `.outputs` and optionally `.domain` — a
  `tarl_jax.sandbox.tasks.Task`, a tau-bench v1 task dict, or a test double.
- `dialogue`: an OpenAI-format message list, or a `tarl_jax.sandbox.record.Episode`.
Agent turns are the assistant messages in order; turn i (0-based here, 1-based in the LLM
prompt) is `Judgement.scores[i]`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from tarl_jax.sandbox.domains import WRITE_TOOLS   # tools that change the database
from tarl_jax.sandbox.record import Episode

TRANSFER_TOOL = "transfer_to_human_agents"
SCORES = (-1, 0, 1)


def write_tools(domain: str | None) -> frozenset[str]:
    """Write tools of `domain`; for an unknown domain the union (tool names do not collide)."""
    if domain in WRITE_TOOLS:
        return WRITE_TOOLS[domain]
    return frozenset().union(*WRITE_TOOLS.values())


@dataclasses.dataclass
class Judgement:
    """Per-agent-turn scores in {-1, 0, +1} with at most one -1, and why."""
    scores: list[int]
    reasons: list[str]
    source: str                     # "llm" | "rule" | ... (a fallback keeps the judge that scored)
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.scores) != len(self.reasons):
            raise ValueError(f"Judgement: {len(self.scores)} scores but {len(self.reasons)} reasons")
        bad = [s for s in self.scores if s not in SCORES or isinstance(s, bool)]
        if bad:
            raise ValueError(f"Judgement: scores must be -1/0/1, got {bad}")
        if self.scores.count(-1) > 1:
            raise ValueError(f"Judgement: at most one -1, got {self.scores}")

    @property
    def negative_turn(self) -> int | None:
        return self.scores.index(-1) if -1 in self.scores else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Judgement":
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class GoldCall:
    name: str
    kwargs: dict


@dataclasses.dataclass(frozen=True)
class TaskView:
    instruction: str
    actions: tuple[GoldCall, ...]
    outputs: tuple[str, ...]
    domain: str | None


def _get(obj: Any, key: str, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def task_view(task: Any, domain: str | None = None) -> TaskView:
    actions = tuple(GoldCall(_get(a, "name"), dict(_get(a, "kwargs") or {}))
                    for a in _get(task, "actions") or ())
    return TaskView(instruction=_get(task, "instruction", "") or "", actions=actions,
                    outputs=tuple(_get(task, "outputs") or ()),
                    domain=domain or _get(task, "domain"))


def dialogue_messages(dialogue: Any) -> tuple[list[dict], str | None]:
    """(messages, domain or None) of a message list or an Episode."""
    if isinstance(dialogue, Episode):
        n_turns, n_asst = len(dialogue.agent_turns), sum(
            m.get("role") == "assistant" for m in dialogue.messages)
        if dialogue.turns and n_turns != n_asst:
            raise ValueError(f"Episode {dialogue.task_id}: {n_turns} AgentTurns but {n_asst} "
                             "assistant messages; a judge scores one per agent turn")
        return dialogue.messages, dialogue.domain
    return list(dialogue), None


def agent_turn_positions(messages: list[dict]) -> list[int]:
    """Indices into `messages` of the agent turns (assistant messages), in order."""
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]


@dataclasses.dataclass(frozen=True)
class Call:
    name: str
    kwargs: dict | None             # None: the arguments were not valid JSON
    result: str | None              # the tool message answering it, when the dialogue has one


def tool_calls(messages: list[dict], pos: int) -> list[Call]:
    """The tool calls of the assistant message at `pos`, each with its tool result."""
    calls = messages[pos].get("tool_calls") or []
    results_by_id, following = {}, []
    for m in messages[pos + 1:]:
        if m.get("role") != "tool":
            break
        following.append(m.get("content"))
        if m.get("tool_call_id"):
            results_by_id[m["tool_call_id"]] = m.get("content")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function", c)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                args = None
        if args is not None and not isinstance(args, dict):
            args = None
        # Tool messages answer by id; id-less dialogues answer positionally.
        result = results_by_id.get(c.get("id")) if c.get("id") in results_by_id else (
            following[k] if k < len(following) else None)
        out.append(Call(fn.get("name", ""), args, result))
    return out


def text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):   # multimodal content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
