"""The agent <-> environment <-> user loop that turns one task into one `Episode`.

The dialogue follows tau-bench: the system prompt is the domain policy, the user speaks first,
every agent message is one step (at most `max_steps`), tool calls are answered by the sandbox,
text goes to the user simulator, and the episode ends when the user says ###STOP###, the agent
transfers to a human, or the steps run out. Unlike tau-bench, which runs only the first tool
call of a message, every call in a message is answered (parallel calls are common in samples).

Whatever the agent emits is recorded and answered, never raised: a malformed tool call (bad
JSON, unknown tool, missing / mistyped / unexpected argument, oversized argument) is answered
with an "Error: ..." tool message, noted in `AgentTurn.errors` and counted in
`Episode.counters`, so the policy learns from its mistakes and the learner sees every token.
Counters: agent_turns, user_turns, tool_calls, tool_error (the tool itself answered "Error..."),
malformed/<kind> with kind in malformed_call, unknown_tool, bad_json, too_long,
missing_argument, unexpected_argument, wrong_type.
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import traceback
from typing import Any, Callable

from tarl_jax.sandbox.record import AgentTurn, EnvTurn, Episode

STOP = "###STOP###"
MAX_ARGUMENTS_CHARS = 8192  # far above any real call; a longer one is a degenerate sample


@dataclasses.dataclass
class AgentReply:
    message: dict                        # OpenAI assistant message (content and/or tool_calls)
    prompt_ids: list[int] | None = None  # ids fed to the policy since its previous turn
    token_ids: list[int] | None = None   # ids it generated for this message
    logprobs: list[float] | None = None
    audio: list[str] | None = None       # speech mode: utterances heard in prompt_ids, in order


class UserError(RuntimeError):
    """The user simulator could not produce a reply (e.g. its LLM endpoint kept failing)."""


class ToolCallError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def run_episode(env, task, agent: Callable, user, max_steps: int = 30,
                reward_variant: str = "taubench") -> Episode:
    """One dialogue: `agent(messages, tools) -> AgentReply | dict`, `user.reply(messages) -> str`
    (see user.py); `env` is a fresh Env for `task`. Episodes ending in agent_error or
    user_error keep reward 0 and say why in reward_info ("traceback" / "user_error")."""
    ep = Episode(task_id=task.task_id, domain=task.domain)
    counters = ep.counters
    tools = env.tools
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools}

    def add(kind: str, msgs: list[dict]) -> None:
        ep.messages.extend(msgs)
        ep.turns.append(EnvTurn(kind=kind, messages=msgs))

    def user_says() -> str | None:
        try:
            text = user.reply(list(ep.messages))
            if not isinstance(text, str):
                raise TypeError(f"user reply must be a str, got {type(text).__name__}")
        except Exception as e:  # noqa: BLE001 - a simulator failure marks the episode only
            ep.termination = "user_error"
            ep.reward_info["user_error"] = f"{type(e).__name__}: {e}"
            return None
        add("user", [{"role": "user", "content": text}])
        _bump(counters, "user_turns")
        return text

    add("system", [{"role": "system", "content": env.policy}])
    if user_says() is None:
        return ep
    for step in range(max_steps):
        try:
            reply = agent(list(ep.messages), tools)
            if isinstance(reply, dict):
                reply = AgentReply(message=reply)
            if not isinstance(reply, AgentReply) or not isinstance(reply.message, dict):
                raise TypeError("the agent must return an AgentReply or a message dict, got "
                                f"{type(reply).__name__}")
            message = reply.message
        except Exception:  # noqa: BLE001 - recorded with its traceback for debugging
            ep.termination = "agent_error"
            ep.reward_info["traceback"] = traceback.format_exc()
            return ep
        turn = AgentTurn(index=step, message=message, prompt_ids=reply.prompt_ids,
                         token_ids=reply.token_ids, logprobs=reply.logprobs, audio=reply.audio)
        ep.turns.append(turn)
        _bump(counters, "agent_turns")
        calls = message.get("tool_calls") or []
        normalized = _normalize(message, step)
        # A sampling agent's parser reports calls it could not read (bad JSON, unclosed tag):
        # they are answered as failed calls, never passed to the user as if they were text.
        parse_errors = normalized.pop("parse_errors", None) or []
        ep.messages.append(normalized)
        for err in parse_errors:
            turn.errors.append(f"parse: {err}")
            _bump(counters, "malformed/parse")
        if calls or parse_errors:
            results = [{"role": "tool", "tool_call_id": None, "name": "",
                        "content": f"Error: malformed tool call: {err}"} for err in parse_errors]
            for call in normalized.get("tool_calls", []):
                _bump(counters, "tool_calls")
                try:
                    name, args = _parse_call(call, schemas)
                    content = env.call(name, args)
                    if isinstance(content, str) and content.startswith("Error"):
                        _bump(counters, "tool_error")
                except ToolCallError as e:
                    content = f"Error: {e}"
                    turn.errors.append(f"{e.kind}: {e}")
                    _bump(counters, f"malformed/{e.kind}")
                results.append({"role": "tool", "tool_call_id": call["id"],
                                "name": _call_name(call), "content": content or ""})
                if env.done:  # a transfer ends the episode; later calls are not run
                    break
            add("tool", results)
            if env.done:
                ep.termination = "transfer"
                break
        else:
            text = user_says()
            if text is None:
                return ep
            if STOP in text:
                ep.termination = "user_stop"
                break
    else:
        ep.termination = "max_steps"
    if ep.termination == "max_steps":  # tau-bench gives a cut episode reward 0
        ep.reward, ep.reward_info = 0.0, {"reason": "max_steps"}
        return ep
    said = [m.get("content") or "" for m in ep.messages if m.get("role") == "assistant"]
    ep.reward, info = env.reward(said, variant=reward_variant)
    ep.reward_info.update(info)
    return ep


def run_episodes(tasks: list, make_env: Callable, make_agent: Callable, make_user: Callable,
                 max_steps: int = 30, reward_variant: str = "taubench",
                 workers: int = 8) -> list[Episode]:
    """Episodes for `tasks`, in order, run concurrently (agents and users are mostly waiting
    on model servers). Factories are called per episode: make_env(task) -> Env,
    make_agent(task) -> agent, make_user(task, env) -> user."""
    def one(task):
        env = make_env(task)
        return run_episode(env, task, make_agent(task), make_user(task, env), max_steps,
                           reward_variant)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, tasks))


def _bump(counters: dict, key: str) -> None:
    counters[key] = counters.get(key, 0) + 1


def _call_name(call: Any) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else ""


def _normalize(message: dict, step: int) -> dict:
    """The message as it goes into the dialogue: role set, every tool call with an id (the
    tool result must refer to it). The agent turn keeps the exact original."""
    out = copy.deepcopy(message)
    out["role"] = "assistant"
    out.setdefault("content", None)
    if out.get("tool_calls"):
        calls = out["tool_calls"] if isinstance(out["tool_calls"], list) else [out["tool_calls"]]
        out["tool_calls"] = [{**(c if isinstance(c, dict) else {"function": c}),
                              "id": (c.get("id") if isinstance(c, dict) else None)
                              or f"call_{step}_{j}", "type": "function"}
                             for j, c in enumerate(calls)]
    else:
        out.pop("tool_calls", None)
    return out


def _parse_call(call: dict, schemas: dict) -> tuple[str, dict]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolCallError("malformed_call", "tool call without a function name")
    name, raw = fn["name"], fn.get("arguments", {})
    if name not in schemas:
        raise ToolCallError("unknown_tool", f"unknown tool {name[:100]!r}; available: "
                            + ", ".join(schemas))
    if isinstance(raw, str):
        if len(raw) > MAX_ARGUMENTS_CHARS:
            raise ToolCallError("too_long", f"arguments of {name} are {len(raw)} characters "
                                f"(limit {MAX_ARGUMENTS_CHARS})")
        try:
            args = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolCallError("bad_json",
                                f"arguments of {name} are not valid JSON ({e})") from None
    else:
        args = raw
        if len(json.dumps(args, default=str)) > MAX_ARGUMENTS_CHARS:
            raise ToolCallError("too_long",
                                f"arguments of {name} exceed {MAX_ARGUMENTS_CHARS} characters")
    if not isinstance(args, dict):
        raise ToolCallError("bad_json", f"arguments of {name} must be a JSON object")
    _check(args, schemas[name], name)
    return name, args


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "array": (list,), "object": (dict,)}


def _check(value: Any, schema: dict, path: str) -> None:
    """Validates shapes against the subset of JSON Schema the tool schemas use. Values (enums,
    ids) are the tools' business: they answer those with tau-bench's own error strings."""
    kind = schema.get("type")
    if kind in _TYPES:
        ok = isinstance(value, _TYPES[kind]) and not (kind != "boolean" and isinstance(value, bool))
        if not ok:
            raise ToolCallError("wrong_type", f"{path} must be of type {kind}, "
                                f"got {type(value).__name__}")
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise ToolCallError("missing_argument",
                                    f"{path} is missing required argument {key!r}")
        for key, sub in value.items():
            if key not in props and "properties" in schema:
                raise ToolCallError("unexpected_argument",
                                    f"{path} got unexpected argument {key[:100]!r}")
            _check(sub, props.get(key, {}), f"{path}.{key}")
    elif kind == "array" and "items" in schema:
        for i, sub in enumerate(value):
            _check(sub, schema["items"], f"{path}[{i}]")
