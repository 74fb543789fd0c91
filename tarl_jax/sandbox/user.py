"""User simulators: a user is an object with `reply(messages) -> str`, made per episode.

`messages` is the episode's dialogue as the agent sees it (system, user, assistant, tool); each
simulator keeps only what a customer would see: the agent's text replies. A reply containing
###STOP### ends the episode.

- `LLMUser`: any OpenAI-compatible chat endpoint, prompted like tau-bench's simulator. Timeouts
  (of the whole reply), connection failures, 429 (after its Retry-After) and 5xx, empty and
  malformed answers are retried with backoff; when retries run out it raises
  `UserError` and the episode is kept with termination "user_error".
- `OfflineUser`: deterministic, answers from the task's gold actions (the embedded default).
- `ReplayUser`: serves replies recorded in earlier episodes, keyed by the dialogue so far.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from typing import Callable

from tarl_jax import llm_io
from tarl_jax.sandbox import domains
from tarl_jax.sandbox.episode import STOP, UserError
from tarl_jax.sandbox.reward import outputs_found
from tarl_jax.sandbox.synth import describe_action

GREETING = "Hi! How can I help you today?"  # what the simulator is told first, as in tau-bench

SYSTEM_PROMPT = """You play a customer talking to a customer-service agent. Stay in character.

Your situation and goals:
{instruction}

How to behave:
- Write exactly one short line per message, as a customer would type it.
- Reveal your goals step by step; share only what the agent needs for the current step.
- Never invent facts (ids, numbers, addresses, names) that are not in your situation. If the agent
  asks for something you were not given, say you don't know or don't remember it.
- Use your own words instead of copying your situation text.
- Keep the personality described in your situation.
- When every goal is reached, or the conversation cannot go further, reply with exactly
  ###STOP### and nothing else."""


def simulator_view(messages: list[dict]) -> list[tuple[str, str]]:
    """(speaker, text) pairs the customer has seen: their own lines and the agent's text replies."""
    out = []
    for m in messages:
        if m.get("role") == "user":
            out.append(("customer", m.get("content") or ""))
        elif m.get("role") == "assistant" and not m.get("tool_calls"):
            out.append(("agent", m.get("content") or ""))  # even empty: it was the agent's turn
    return out


# ----------------------------------------------------------------------------- LLM user

@dataclasses.dataclass
class LLMUserConfig:
    model: str
    base_url: str
    api_key: str = "EMPTY"
    temperature: float = 0.0
    timeout: float = 60.0
    max_retries: int = 3      # retries after the first attempt
    backoff: float = 1.0      # seconds before the first retry, doubled each time
    max_retry_after_s: float = 60.0   # a 429/503's Retry-After is honoured up to this
    max_reply_chars: int = 4000       # a longer "customer line" is a broken answer: retried


class LLMUser:
    def __init__(self, instruction: str, cfg: LLMUserConfig):
        self.cfg = cfg
        self.system = SYSTEM_PROMPT.format(instruction=instruction)

    def chat(self, messages: list[dict]) -> list[dict]:
        """The simulator's own chat: roles swapped, the agent's greeting first."""
        chat = [{"role": "system", "content": self.system}, {"role": "user", "content": GREETING}]
        for speaker, text in simulator_view(messages):
            chat.append({"role": "assistant" if speaker == "customer" else "user", "content": text})
        return chat

    def reply(self, messages: list[dict]) -> str:
        # Async under the hood (episodes call this from rollout threads, none inside an event
        # loop): wait_for bounds the whole reply, where the client's timeout is per read and a
        # reply dripped a byte at a time would never end.
        return asyncio.run(self._reply(self.chat(messages)))

    async def _reply(self, chat: list[dict]) -> str:
        import openai  # imported on use: it takes seconds, and offline runs never need it
        cfg = self.cfg

        def accept(answer):
            text = answer["content"].strip()
            if not text:
                raise ValueError("empty reply")
            if len(text) > cfg.max_reply_chars:
                raise ValueError(f"a reply of {len(text)} characters "
                                 f"(max_reply_chars={cfg.max_reply_chars})")

        async with openai.AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key,
                                      timeout=cfg.timeout, max_retries=0) as client:
            try:
                answer, _ = await llm_io.complete(
                    lambda: client.chat.completions.create(
                        model=cfg.model, messages=chat, temperature=cfg.temperature),
                    max_retries=cfg.max_retries, backoff_s=cfg.backoff, timeout_s=cfg.timeout,
                    max_retry_after_s=cfg.max_retry_after_s, accept=accept)
            except llm_io.Refused as e:   # a configuration error
                raise UserError(f"user simulator endpoint refused the request: {e}") from e
            except llm_io.GaveUp as e:
                raise UserError(f"user simulator failed after {e}") from e
        text = answer["content"].strip()
        return STOP if STOP in text else text


# ----------------------------------------------------------------------------- offline user

_ASKS_IDENTITY = re.compile(r"\b(e-?mail|zip|user id|first name|last name|full name|your name|"
                            r"identify|identity|verify|authenticate)\b")
_ASKS_CONFIRM = re.compile(r"\b(confirm|proceed|go ahead|shall i|should i|would you like me to|"
                           r"do you want me to)\b|\(yes/no\)|yes or no")


class OfflineUser:
    """A deterministic customer who knows the task's gold writes and says them plainly.

    It opens with its requests (ids and all), gives its identity when asked, answers "yes" to a
    confirmation while a gold write is still to be done, asks for the required outputs, and stops
    once every gold write has been attempted with the gold arguments and every output was said.
    `world` (the initial database) provides name and zip where the task does not.
    """

    def __init__(self, task, world=None):
        self.task = task
        self.writes = domains.gold_writes(task)
        self.identity = _identity(task, world)

    def opening(self) -> str:
        asks = [describe_action(a) for a in self.writes]
        extra = self.task.extra
        parts = [f"I'd like to {' and '.join(asks)}."] if asks else []
        parts += [extra["request"]] if extra.get("request") else []
        if self.task.outputs:
            parts.append(extra.get("question") or "I also need some information from you.")
        return " ".join(["Hi!"] + (parts or ["I have a question about my account."]))

    def reply(self, messages: list[dict]) -> str:
        view = simulator_view(messages)
        agent = [text.lower() for who, text in view if who == "agent"]
        if not agent:
            return self.opening()
        last = agent[-1]
        said_identity = any(self.identity in text for who, text in view if who == "customer")
        remaining = _unattempted(self.writes, messages)
        if _ASKS_IDENTITY.search(last) and not said_identity:
            return self.identity
        if remaining and _ASKS_CONFIRM.search(last):
            return "Yes, please go ahead."
        if _ASKS_IDENTITY.search(last):
            return self.identity
        if remaining:
            return f"I'd like to {describe_action(remaining[0])}."
        if not all(outputs_found(self.task.outputs, agent).values()):
            return (self.task.extra.get("question")
                    or "Could you also give me the information I asked for?")
        return STOP


def _identity(task, world) -> str:
    ident = task.extra.get("identity")
    if ident:
        if ident["by"] == "email":
            return f"My email is {ident['email']}."
        return f"I'm {ident['first_name']} {ident['last_name']}, zip code {ident['zip']}."
    for a in task.actions:
        if a.name == "find_user_id_by_email":
            return f"My email is {a.kwargs['email']}."
        if a.name == "find_user_id_by_name_zip":
            k = a.kwargs
            return f"I'm {k['first_name']} {k['last_name']}, zip code {k['zip']}."
    text = None
    if world is not None and task.domain == "retail":
        text = world.initial_text("users", task.user_id)
    if text:
        user = json.loads(text)
        return (f"I'm {user['name']['first_name']} {user['name']['last_name']}, "
                f"zip code {user['address']['zip']}.")
    return f"My user id is {task.user_id}."


def _unattempted(writes: list, messages: list[dict]) -> list:
    """Gold writes the agent has not yet called with exactly the gold arguments."""
    calls = []
    for m in messages:
        for c in (m.get("tool_calls") or []) if m.get("role") == "assistant" else []:
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict):
                continue
            args = fn.get("arguments")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                continue
            calls.append((fn.get("name"), _canon(args)))
    remaining = []
    for a in writes:
        key = (a.name, _canon(a.kwargs))
        if key in calls:
            calls.remove(key)
        else:
            remaining.append(a)
    return remaining


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True)


# ----------------------------------------------------------------------------- replay user

def dialogue_key(messages: list[dict]) -> str:
    """Hash of what the customer has seen so far (tool traffic is invisible to them, so a
    recorded reply still applies when the agent's tool calls differ)."""
    return hashlib.sha256(json.dumps(simulator_view(messages)).encode()).hexdigest()


class ReplayUser:
    def __init__(self, replies: dict[str, str], fallback=None):
        self.replies, self.fallback = replies, fallback

    @staticmethod
    def record(episodes) -> dict[str, str]:
        """dialogue_key(prefix) -> the user's reply, from finished episodes."""
        table = {}
        for ep in episodes:
            for i, m in enumerate(ep.messages):
                if m.get("role") == "user":
                    table[dialogue_key(ep.messages[:i])] = m.get("content") or ""
        return table

    def reply(self, messages: list[dict]) -> str:
        key = dialogue_key(messages)
        if key in self.replies:
            return self.replies[key]
        if self.fallback is not None:
            return self.fallback.reply(messages)
        raise UserError(f"no recorded user reply for this dialogue (key {key[:12]})")


# ----------------------------------------------------------------------------- factory

def user_factory(kind: str = "offline", replies: dict[str, str] | None = None,
                 **llm) -> Callable:
    """(task, env) -> user, from config: kind "offline", "llm" (LLMUserConfig fields as keyword
    arguments) or "replay" (`replies` from ReplayUser.record)."""
    if kind == "offline":
        return lambda task, env: OfflineUser(task, getattr(env, "world", None))
    if kind == "llm":
        cfg = LLMUserConfig(**llm)
        return lambda task, env: LLMUser(task.instruction, cfg)
    if kind == "replay":
        return lambda task, env: ReplayUser(replies or {})
    raise ValueError(f"unknown user kind {kind!r} (known: offline, llm, replay)")
