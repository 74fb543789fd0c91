"""A run's config checked before anything expensive (data, model, warm start): every mistake at
once, each as one line naming the key, what it holds and what it may hold. `main` prints them
and exits 2.

Rules are small functions of the config; a section a config lacks is not checked (configs of
other shapes, e.g. tests' own, stay usable).
"""
from __future__ import annotations

import os
import pathlib

MODES = ("train", "eval", "serve", "warmstart")


class ConfigError(ValueError):
    """Raised with every problem found, one per line."""


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if node is None or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _int_at_least(low: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            return f"must be an integer >= {low}"
    return check


def _one_of(*choices):
    def check(v):
        if v not in choices:
            return "choose " + " | ".join(map(str, choices))
    return check


def _number(low: float, high: float = float("inf"), low_open: bool = False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "must be a number"
        if v < low or v > high or (low_open and v == low):
            return f"must be in {'(' if low_open else '['}{low}, {high}]"
    return check


def _positive_ints(v):
    if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
        return "must be a non-empty list of integers >= 1"


def _registry(name: str):
    """Allowed values owned by the modules that use them."""
    def check(v):
        from tarl_jax import rollout
        from tarl_jax.rl import advantages, losses, pack
        from tarl_jax.sandbox import synth
        allowed = {"algo": (*advantages.REGISTRY, "ppo", "sft"), "credit": advantages.CREDIT_MODES,
                   "policy_loss": tuple(losses.POLICY_LOSSES),
                   "agg": ("", *losses.AGGREGATIONS), "kl_estimator": tuple(losses.KL_ESTIMATORS),
                   "tool_view": tuple(rollout.TOOL_VIEWS), "overflow": tuple(pack.OVERFLOW_RULES),
                   "result_view": tuple(synth.RESULT_VIEWS)}[name]
        if v not in allowed:
            return "choose " + " | ".join(repr(a) if a == "" else a for a in allowed)
    return check


RULES = {
    "mode": _one_of(*MODES),
    "total_steps": _int_at_least(0),
    "eval_every": _int_at_least(1),
    "checkpoint_every": _int_at_least(1),
    "rollout.tasks_per_step": _int_at_least(1),
    "rollout.samples_per_task": _int_at_least(1),
    "rollout.max_turn_tokens": _int_at_least(1),
    "rollout.cache_len": _int_at_least(2),
    "rollout.max_rows": _int_at_least(0),
    "rollout.decode_chunk": _int_at_least(0),
    "rollout.tensor": lambda v: None if type(v) is int and (v == -1 or v >= 1) else
                                "must be -1 (all of a host's devices) or an integer >= 1",
    "rollout.eval_samples": _int_at_least(1),
    "rollout.final_samples": _int_at_least(0),
    "rollout.temperature": _number(0.0),
    "rollout.eval_temperature": _number(0.0),
    "rollout.top_p": _number(0.0, 1.0, low_open=True),
    "rollout.top_k": _int_at_least(0),
    "rollout.infeasible": _one_of("warn", "error", "ignore"),
    "world.eval_split": _one_of("test", "validation"),
    "world.eval_tasks": _int_at_least(1),
    "world.max_steps": _int_at_least(1),
    "world.tool_view": _registry("tool_view"),
    "world.result_view": _registry("result_view"),
    "user.kind": _one_of("offline", "llm"),
    "judge.kind": _one_of("rule", "llm", "none"),
    "rl.algo": _registry("algo"),
    "rl.credit": _registry("credit"),
    "rl.policy_loss": _registry("policy_loss"),
    "rl.agg": _registry("agg"),
    "rl.kl_estimator": _registry("kl_estimator"),
    "rl.kl_coef": _number(0.0),
    "rl.epochs": _int_at_least(1),
    "rl.microbatches": _int_at_least(1),
    "rl.max_nonfinite": _int_at_least(1),
    "rl.sft_seconds": _number(0.0),
    "pack.seq_lens": _positive_ints,
    "pack.rows": _positive_ints,
    "pack.overflow": _registry("overflow"),
    "optim.lr": _number(0.0, low_open=True),
    "optim.clip_norm": _number(0.0, low_open=True),
    "warmstart.steps": _int_at_least(0),
    "warmstart.batch_rows": _int_at_least(1),
    "warmstart.seq_len": _int_at_least(2),
    "math.fraction": _number(0.0, 1.0),
}


def problems(config, here: bool = True) -> list[str]:
    """Every problem of `config`, one line each ("key=value: what is allowed"). here: also what
    this machine must provide (data directories, warm-start files, LLM endpoints); False for a
    config checked on one machine to run on another (launch.compile)."""
    out = []
    for key, rule in RULES.items():
        value = _get(config, key)
        if value is _MISSING:
            continue
        why = rule(tuple(value) if isinstance(value, list) else value)
        if why:
            out.append(f"{key}={value!r}: {why}")
    if not here:
        return out
    data_dir = _get(config, "world.data_dir")
    if isinstance(data_dir, str) and data_dir and not pathlib.Path(data_dir).is_dir():
        out.append(f"world.data_dir={data_dir!r}: no such directory (a tau-bench or tau2 data "
                   "directory, or '' for the synthetic world)")
    source = _get(config, "world.source")
    if source not in (_MISSING, "synthetic") and not data_dir:
        out.append(f"world.source={source!r} reads a tau-bench directory: set world.data_dir "
                   "(or world.source='synthetic')")
    init = _get(config, "warmstart.init")
    if isinstance(init, str) and init:
        from tarl_jax.rl import checkpoint
        path = checkpoint.warm_start_path(init)
        if not path.is_file():
            out.append(f"warmstart.init={init!r}: {path} does not exist (make one with "
                       "--config.mode=warmstart, or '' to warm-start in the run)")
    if _get(config, "warmstart.climb") is True and (not init or _get(config, "mode") != "warmstart"):
        out.append("warmstart.climb=True continues SFT from a file made on another level: it needs "
                   "--config.mode=warmstart and warmstart.init (a run starts only from a file "
                   "made for its own world)")
    for key in ("user", "judge.llm") if _get(config, "mode") in ("train", "eval") else ():
        section = _get(config, key)
        kind = _get(config, "user.kind" if key == "user" else "judge.kind")
        if section is not _MISSING and kind == "llm" and not section.get("base_url") \
                and not os.environ.get(section.get("api_key_env", "OPENAI_API_KEY") or ""):
            out.append(f"{key}.base_url is empty and ${section.get('api_key_env', 'OPENAI_API_KEY')}"
                       " is unset: an llm " + ("user" if key == "user" else "judge") +
                       " needs an endpoint (a local server's URL) or an API key")
    return out


def check(config, here: bool = True) -> None:
    """Raises ConfigError listing every problem."""
    found = problems(config, here)
    if found:
        raise ConfigError("\n".join(found))
