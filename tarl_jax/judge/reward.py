"""TARL reward: the verifiable outcome combined with the judge's per-turn scores.

Trajectory reward, for T agent turns with scores s_1..s_T in {-1, 0, +1} (at most one -1):

    R = w_out * outcome - w_neg * [some s_t == -1] + (w_pos / T) * sum_{t : s_t != -1} s_t

"Other turns" are all turns except the one scored -1 (all T turns when there is none); the -1
is priced by w_neg alone, never also by w_pos / T. Defaults w_out=10, w_neg=5, w_pos=5 (the
paper's) give these bands, for outcome in {0, 1}:
    success, no -1: [10, 15] (15 = every turn +1)     success with a -1: [5, 10)
    failure, no -1: [0, 5]                            failure with a -1: [-5, 0)

Per-turn rewards (for per-turn credit assignment) split R exactly over the turns:

    r_t = w_out * outcome / T + (-w_neg if s_t == -1 else (w_pos / T) * s_t)

i.e. each turn carries its own score's term plus an equal 1/T share of the outcome, so
sum_t r_t == R. Weights come from a config: an ml_collections ConfigDict or a dict with any of
w_out / w_neg / w_pos (missing keys keep their defaults).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

DEFAULTS = {"w_out": 10.0, "w_neg": 5.0, "w_pos": 5.0}


def weights(cfg: Mapping[str, Any] | Any | None = None) -> dict[str, float]:
    if cfg is None:
        return dict(DEFAULTS)
    unknown = set(cfg.keys()) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"reward config: unknown keys {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    return {k: float(cfg[k]) if k in cfg else v for k, v in DEFAULTS.items()}


def _check(scores: Sequence[int]) -> None:
    if any(s not in (-1, 0, 1) for s in scores) or list(scores).count(-1) > 1:
        raise ValueError(f"scores must be -1/0/+1 with at most one -1, got {list(scores)}")


def trajectory_reward(scores: Sequence[int], outcome: float, cfg=None) -> float:
    _check(scores)
    w = weights(cfg)
    r = w["w_out"] * outcome
    if -1 in scores:
        r -= w["w_neg"]
    if scores:
        r += w["w_pos"] / len(scores) * sum(s for s in scores if s != -1)
    return r


def turn_rewards(scores: Sequence[int], outcome: float, cfg=None) -> list[float]:
    _check(scores)
    if not scores:
        raise ValueError("turn_rewards: no agent turns to carry the reward")
    w, n = weights(cfg), len(scores)
    share = w["w_out"] * outcome / n
    return [share + (-w["w_neg"] if s == -1 else w["w_pos"] / n * s) for s in scores]
