"""Do the configured limits leave room to succeed? The scripted expert's own path through each
task, tokenised exactly as a rollout feeds the policy (same prompt, tool view, tokenizer), is the
yardstick: if its longest reply exceeds `rollout.max_turn_tokens`, its dialogue outgrows
`rollout.cache_len`, or it needs more agent steps than `world.max_steps`, no policy can solve
that task as configured (a cut reply fails to parse; a full cache ends the episode), and RL on it
teaches nothing. The trainer runs this at start-up and warns loudly (or refuses, with
`rollout.infeasible="error"`).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from tarl_jax import rollout
from tarl_jax.sandbox import synth

log = logging.getLogger("tarl_jax")


def expert_episodes(world, tok, tool_view, tasks, speech=None, max_steps: int = 30) -> list:
    """The expert's episode on each task, its turns carrying the ids a policy would be fed and
    would generate. `speech`: every other episode is heard (the warm start's mix)."""
    episodes = []
    for i, t in enumerate(tasks):
        hear = speech if i % 2 else None
        teacher = rollout.TeacherAgent(synth.ExpertAgent(t), tok, tool_view=tool_view,
                                       enable_thinking=False, speech=hear, user_id=t.user_id)
        episodes.append(world.run_one(t, teacher, max_steps))
        if hear is not None:
            rollout.mark_speech(episodes[-1])
    return episodes


def fit(episode) -> dict:
    """The limits one expert episode needs: its longest reply, its whole dialogue in tokens (all
    ids fed and generated), its agent steps; and whether the expert solved it at all."""
    turns = episode.agent_turns
    replies = [len(t.token_ids or ()) for t in turns]
    return {"task_id": episode.task_id, "solved": episode.reward >= 1,
            "reply": max(replies, default=0),
            "tokens": sum(len(t.prompt_ids or ()) + len(t.token_ids or ()) for t in turns),
            "steps": len(turns)}


def check(episodes, max_turn_tokens: int, cache_len: int, max_steps: int) -> dict:
    """How many tasks the limits rule out, and why (a task can fail several limits)."""
    fits = [fit(ep) for ep in episodes]
    why = {"unsolved": [f for f in fits if not f["solved"]],
           "reply_over_max_turn_tokens": [f for f in fits if f["reply"] > max_turn_tokens],
           "dialogue_over_cache_len": [f for f in fits if f["tokens"] > cache_len],
           "steps_over_max_steps": [f for f in fits if f["steps"] > max_steps]}
    bad = {f["task_id"] for v in why.values() for f in v}
    out = {"tasks": len(fits), "infeasible": len(bad), **{k: len(v) for k, v in why.items()}}
    for key in ("reply", "tokens", "steps"):
        values = np.array([f[key] for f in fits] or [0])
        out[f"expert_{key}_max"] = int(values.max())
        out[f"expert_{key}_p90"] = float(np.percentile(values, 90))
    return out


def enforce(report: dict, split: str, limits: str, policy: str) -> None:
    """Log the report; `policy` warn (loud) | error (refuse) | ignore."""
    if policy not in ("warn", "error", "ignore"):
        raise ValueError(f"rollout.infeasible={policy!r}: choose warn | error | ignore")
    n, bad = report["tasks"], report["infeasible"]
    if not bad or policy == "ignore":
        log.info("limits: the expert's path fits %s on all %d %s tasks", limits, n, split)
        return
    detail = ", ".join(f"{k} {report[k]}" for k in ("unsolved", "reply_over_max_turn_tokens",
                                                      "dialogue_over_cache_len",
                                                      "steps_over_max_steps") if report[k])
    msg = (f"{bad} of {n} {split} tasks cannot be solved under {limits}: the expert's own path "
           f"does not fit ({detail}; the expert needs replies up to {report['expert_reply_max']} "
           f"tokens, dialogues up to {report['expert_tokens_max']} tokens, "
           f"{report['expert_steps_max']} steps)")
    if policy == "error":
        raise ValueError(msg + "; raise the limits or set rollout.infeasible=warn")
    log.warning("WARNING: %s", msg)


def check_run(config, world, tok, tool_view) -> dict:
    """`check` and `enforce` on a run's training tasks and the tasks it evaluates on."""
    c, t0 = config, time.perf_counter()
    r = c.rollout
    limits = (f"rollout.max_turn_tokens={r.max_turn_tokens}, rollout.cache_len={r.cache_len}, "
              f"world.max_steps={c.world.max_steps}")
    evaluated = "validation" if c.world.get("eval_split", "test") == "validation" else "held-out"
    out = {}
    for split, tasks in (("train", world.train), (evaluated, world.eval)):
        eps = expert_episodes(world, tok, tool_view, tasks)
        out[split] = check(eps, r.max_turn_tokens, r.cache_len, c.world.max_steps)
        enforce(out[split], split, limits, r.infeasible)
    warning = pack_room(c)
    if warning:
        log.warning("limits: %s", warning)
    log.info("limits: checked in %.1f s", time.perf_counter() - t0)
    return out


def pack_room(config) -> str:
    """What a step's packing may not hold ("" if it holds the worst case): episodes longer than
    half the longest row each take a row of their own, so a step's episodes, each up to
    rollout.cache_len tokens, may need one row apiece. Said at start-up, not after the step's
    rollouts."""
    r, p = config.rollout, config.pack
    episodes = r.tasks_per_step * r.samples_per_task
    seq = max(p.seq_lens)
    need = -(-episodes // max(1, seq // r.cache_len))
    if need <= max(p.rows):
        return ""
    return (f"a step's {episodes} episodes of up to {min(r.cache_len, seq)} tokens may need "
            f"{need} rows of {seq}, and pack.rows tops at {max(p.rows)}: a step whose episodes "
            f"run long stops at packing, after its rollouts; add a bucket (e.g. "
            f"--config.pack.rows='{tuple(sorted(set(p.rows) | {need}))}')")
