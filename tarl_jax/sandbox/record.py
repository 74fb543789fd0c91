"""The record of one episode: the contract between sandbox, judge and learner.

An episode alternates environment turns (the user speaks, or tools answer) and agent turns.
`messages` is the whole dialogue in OpenAI chat format (what an LLM judge reads, what
tau-bench's harness exchanges). `turns` keeps the boundaries explicit: the judge scores each
`AgentTurn`, the learner puts advantages on its tokens. An agent that samples from a model
attaches, per turn, the ids it was fed since its previous turn (`prompt_ids`: system prompt,
rendered user/tool messages) and the ids it generated (`token_ids`, with `logprobs`); the
concatenation of prompt_ids + token_ids over all agent turns is exactly the token stream the
policy saw, so packing never re-tokenises text.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class AgentTurn:
    index: int                      # 0-based number of this agent turn in the episode
    message: dict                   # the exact assistant message (OpenAI format, may carry tool_calls)
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    errors: list[str] = dataclasses.field(default_factory=list)  # malformed tool calls etc.
    # Speech mode: the utterances (audio refs) whose <|AUDIO|> placeholders are in prompt_ids, in order.
    audio: list[str] | None = None


@dataclasses.dataclass
class EnvTurn:
    kind: str                       # "user" | "tool" | "system"
    messages: list[dict]            # the OpenAI-format messages this turn added
    audio: list[Any] | None = None  # per message: reference to synthesised audio (speech mode)


@dataclasses.dataclass
class Episode:
    task_id: str
    domain: str
    messages: list[dict] = dataclasses.field(default_factory=list)
    turns: list[AgentTurn | EnvTurn] = dataclasses.field(default_factory=list)
    termination: str = ""           # user_stop | transfer | max_steps | user_error | agent_error
    reward: float = 0.0             # verifiable outcome in [0, 1]
    reward_info: dict = dataclasses.field(default_factory=dict)
    counters: dict = dataclasses.field(default_factory=dict)
    mode: str = "text"              # text | speech | math

    @property
    def agent_turns(self) -> list[AgentTurn]:
        return [t for t in self.turns if isinstance(t, AgentTurn)]

    @property
    def heard_audio(self) -> list[str]:
        """Speech mode: every utterance the agent heard, in the order of its placeholders."""
        return [r for t in self.agent_turns for r in (t.audio or [])]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["turns"] = [dict(type=type(t).__name__, **dataclasses.asdict(t)) for t in self.turns]
        return json.dumps(d)

    @classmethod
    def from_json(cls, line: str) -> "Episode":
        d = json.loads(line)
        kinds = {"AgentTurn": AgentTurn, "EnvTurn": EnvTurn}
        d["turns"] = [kinds[t.pop("type")](**t) for t in d["turns"]]
        return cls(**d)
