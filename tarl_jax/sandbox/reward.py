"""Outcome rewards (tau-bench's rule and the TARL variant) and pass^k.

tau-bench hashes `str(to_hashable(data))` of the whole database (dicts as key-sorted tuples,
lists as tuples) after the episode and after a gold replay. Two databases hash alike exactly
when every record is equal in that form, and the only records that can differ are those the
episode or the gold replay wrote. So `same_state` compares just those, in a canonical form with
the same distinctions as tau-bench's (`json.dumps(sort_keys=True)`: 1 vs 1.0, "1" vs 1, True vs
1 all stay different, key order does not matter, list order does).
"""
from __future__ import annotations

import collections
import json
import math
from typing import Callable, Iterable


def canonical(text: str | None) -> str | None:
    return None if text is None else json.dumps(json.loads(text), sort_keys=True)


def same_state(initial: Callable[[str, str], str | None],
               written_a: dict[tuple[str, str], str],
               written_b: dict[tuple[str, str], str]) -> bool:
    """Whether two forks of one template are equal; `written_*` hold the records each wrote
    ((table, id) -> JSON text), `initial(table, id)` reads the template."""
    for key in written_a.keys() | written_b.keys():
        a = written_a[key] if key in written_a else initial(*key)
        b = written_b[key] if key in written_b else initial(*key)
        if a != b and canonical(a) != canonical(b):
            return False
    return True


def outputs_found(outputs: Iterable[str], said: Iterable[str]) -> dict[str, bool]:
    """tau-bench's output check: each required string, lower-cased, occurs in some agent
    message lower-cased with its commas removed (the required string keeps its commas)."""
    said = [s.lower().replace(",", "") for s in said if isinstance(s, str)]
    return {o: any(o.lower() in s for s in said) for o in outputs}


def canonical_call(name: str, kwargs: dict) -> str:
    return json.dumps([name, kwargs], sort_keys=True)


def writes_match(agent: Iterable[str], gold: Iterable[str]) -> tuple[bool, dict]:
    """TARL's outcome: the agent's effective write calls (canonical_call strings) equal the
    gold ones as a multiset; info lists what is missing and what is extra."""
    a, g = collections.Counter(agent), collections.Counter(gold)
    return a == g, {"missing": sorted((g - a).elements()), "extra": sorted((a - g).elements())}


def is_success(reward: float) -> bool:
    return abs(reward - 1.0) <= 1e-6


def pass_hat_k(trials: dict[str, list[float]], k: int) -> float:
    """pass^k = mean over tasks of C(c, k) / C(n, k), c successes out of n >= k trials."""
    if not trials:
        raise ValueError("pass^k of no tasks")
    total = 0.0
    for task, rewards in trials.items():
        n, c = len(rewards), sum(map(is_success, rewards))
        if n < k:
            raise ValueError(f"task {task}: {n} trials < k={k}")
        total += math.comb(c, k) / math.comb(n, k)
    return total / len(trials)
