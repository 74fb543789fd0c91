"""Intervals for success rates measured on a fixed set of tasks.

`wilson`: the Wilson score interval of a proportion (good at small n and near 0 or 1, where the
normal approximation gives intervals outside [0, 1]). `paired_difference`: after minus before
on the same tasks, with the paired t interval of the per-task differences (each task is its own
control, so the task-to-task spread cancels); `detectable_difference`: the smallest true
difference such an experiment finds with the given power.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def wilson(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n <= 0:
        return (0.0, 1.0)
    z = sps.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(before, after, confidence: float = 0.95) -> dict:
    """Per-task success (a 0/1 outcome or a mean over samples) before and after, same task
    order. Returns {"diff", "low", "high", "n", "improved", "worsened"}."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"paired results need equal 1-d shapes, got {before.shape} {after.shape}")
    d, n = after - before, len(before)
    out = {"diff": float(d.mean()) if n else 0.0, "n": n,
           "improved": int((d > 0).sum()), "worsened": int((d < 0).sum())}
    if n < 2 or not d.std():
        out.update(low=out["diff"], high=out["diff"])
        return out
    half = sps.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    out.update(low=out["diff"] - half, high=out["diff"] + half)
    return out


def detectable_difference(n: int, p: float, discordant: float | None = None,
                          alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest after-minus-before difference a paired comparison on n tasks detects with
    `power` at two-sided `alpha`, for a baseline rate p. `discordant`: the share of tasks whose
    outcome changes either way (default 2 p (1 - p), independent outcomes: conservative)."""
    q = 2 * p * (1 - p) if discordant is None else discordant
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return float(z * math.sqrt(max(q, 1e-12) / n))


def cluster_bootstrap(x, reps: int = 10000, confidence: float = 0.95, seed: int = 0):
    """Percentile interval and standard error of the mean of x[seeds, tasks], resampling seeds
    and then tasks with replacement (both vary between repeats of an experiment; with one seed,
    tasks only). Pass the paired difference of two arms as x to compare them: the same
    resampled seeds and tasks for both. Returns (low, high, standard error)."""
    x = np.asarray(x, float)
    if x.ndim != 2 or not x.size:
        raise ValueError(f"x must be [seeds, tasks] and non-empty, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    s, t = x.shape
    rows = rng.integers(0, s, (reps, s)) if s > 1 else np.zeros((reps, 1), int)
    cols = rng.integers(0, t, (reps, t))
    means = x[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi), float(means.std(ddof=1))
