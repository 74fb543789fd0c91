"""The math task family: single-turn problems with a verifiable final answer.

Problems come from reasoning-gym's procedural generators (offline, seeded; e.g. gsm_symbolic,
basic_arithmetic) or from DeepScaleR / GSM8K style JSONL files. Answers are graded with
math-verify (equivalent forms count: 1/2 = 0.5 = \\frac{2}{4}); where it finds nothing to compare,
the last integer of the response (preferring the last \\boxed{...}) is compared instead. An
episode is recorded in the same `Episode` format as tool-use dialogues (mode="math").
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
import threading
import traceback
from typing import Callable

from tarl_jax.sandbox.episode import AgentReply
from tarl_jax.sandbox.record import AgentTurn, EnvTurn, Episode
from tarl_jax.sandbox.tasks import Task

SYSTEM_PROMPT = ("Solve the problem step by step. Give the final answer as a number inside "
                 "\\boxed{}.")
MAX_GRADED_CHARS = 4000   # the final answer sits at the end; bounds the parser's work
_INTEGER = re.compile(r"-?\d+")


def reasoning_gym_tasks(name: str = "gsm_symbolic", size: int = 100, seed: int = 0,
                        **options) -> list[Task]:
    """`size` problems from a reasoning-gym generator (no network: they are procedural)."""
    import reasoning_gym
    data = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    return [_task(f"math-{name}-s{seed}-{i:05d}", row["question"], str(row["answer"]), name)
            for i, row in enumerate(data)]


def load_jsonl(path: str | pathlib.Path, integer_only: bool = True,
               limit: int | None = None) -> list[Task]:
    """Rows with `question` or `problem` and `answer` (GSM8K's "...#### 42" included).
    `integer_only` keeps problems whose answer is an integer (as the TARL paper does)."""
    path = pathlib.Path(path)
    tasks = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        question = row.get("question") or row.get("problem")
        if question is None or "answer" not in row:
            raise ValueError(f"{path}:{i + 1}: needs 'question' or 'problem', and 'answer'")
        answer = final_answer(str(row["answer"]))
        if integer_only and not _INTEGER.fullmatch(answer):
            continue
        tasks.append(_task(f"math-{path.stem}-{i:05d}", question, answer, path.stem))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def final_answer(answer: str) -> str:
    """The final answer of a dataset row: GSM8K's text after '####', thousands commas and a
    surrounding $...$ removed."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    answer = answer.strip().strip("$").strip()
    return answer.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", answer) else answer


def _task(task_id: str, question: str, answer: str, source: str) -> Task:
    return Task(task_id=task_id, domain="math", user_id="", instruction=question, actions=[],
                outputs=[answer], extra={"source": source})


def grade(response: str, answer: str) -> bool:
    """Whether `response` ends with an answer equal to `answer`."""
    response = (response or "")[-MAX_GRADED_CHARS:]
    try:
        verdict = _math_verify(response, answer)
    except ImportError:
        verdict = None
    if verdict is not None:
        return verdict
    guess = last_integer(response)
    return guess is not None and _INTEGER.fullmatch(answer.strip()) is not None \
        and int(guess) == int(answer.strip())


def _math_verify(response: str, answer: str) -> bool | None:
    """math-verify's verdict, or None where it extracted no answer from the response."""
    from math_verify import parse, verify
    # Its timeouts use SIGALRM, which only the main thread may set; rollout threads run without.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every timeout=None call
    target = parse(response, parsing_timeout=timeout)
    if not target:
        return None
    gold = parse(answer, parsing_timeout=timeout) or parse(f"${answer}$", parsing_timeout=timeout)
    return bool(verify(gold, target, timeout_seconds=timeout))


def last_integer(text: str) -> str | None:
    """The last integer inside the last \\boxed{...}, else the last integer of the text."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    for source in ([boxed[-1]] if boxed else []) + [text]:
        found = _INTEGER.findall(source.replace(",", ""))
        if found:
            return found[-1]
    return None


def run_math_episode(task: Task, agent: Callable, system_prompt: str = SYSTEM_PROMPT) -> Episode:
    """One question, one agent answer, graded. `agent(messages, tools=[]) -> AgentReply | dict`."""
    ep = Episode(task_id=task.task_id, domain="math", mode="math")
    for kind, msg in (("system", {"role": "system", "content": system_prompt}),
                      ("user", {"role": "user", "content": task.instruction})):
        ep.messages.append(msg)
        ep.turns.append(EnvTurn(kind=kind, messages=[msg]))
    try:
        reply = agent(list(ep.messages), [])
        reply = AgentReply(message=reply) if isinstance(reply, dict) else reply
    except Exception:  # noqa: BLE001 - recorded, like tool-use episodes
        ep.termination = "agent_error"
        ep.reward_info["traceback"] = traceback.format_exc()
        return ep
    message = {**reply.message, "role": "assistant"}
    ep.messages.append(message)
    ep.turns.append(AgentTurn(index=0, message=reply.message, prompt_ids=reply.prompt_ids,
                              token_ids=reply.token_ids, logprobs=reply.logprobs))
    ep.counters["agent_turns"] = 1
    ep.termination = "answered"
    ep.reward = float(grade(message.get("content") or "", task.outputs[0]))
    ep.reward_info = {"variant": "math", "answer": task.outputs[0]}
    return ep
