"""Episodes -> rewards: judge every agent turn (rule or LLM judge, or none), combine the
verdicts with each episode's verifiable outcome (judge/reward.py), and report how the judge
behaved (its -1 rate, agreement with the outcome and, for an LLM judge, with the rule judge).
"""
from __future__ import annotations

import numpy as np

from tarl_jax.judge import reliability
from tarl_jax.judge import reward as judge_reward
from tarl_jax.judge import rules as rule_judge


def score_episodes(episodes, tasks, config) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Judge every episode and combine the verdicts with its outcome.

    Args:
      episodes: finished episodes (math episodes and those without agent turns are not judged).
      tasks: the task of each episode (same order).
      config: the run's config (judge.kind: none | rule | llm; judge.llm; reward weights).
    Returns:
      (trajectory rewards [N], per-turn rewards [N, K] (K: the most agent turns; 0 past an
      episode's end), metrics: outcome, reward and judge/* statistics).
    """
    outcomes = [ep.reward for ep in episodes]
    kind = config.judge.kind
    if kind not in ("none", "rule", "llm"):
        raise ValueError(f"judge.kind={kind!r}: choose none | rule | llm")
    judged = [i for i, ep in enumerate(episodes)
              if kind != "none" and ep.mode != "math" and ep.agent_turns]
    judgements = [None] * len(episodes)
    metrics = {}
    if kind == "rule":
        for i in judged:
            judgements[i] = rule_judge.judge(tasks[i], episodes[i])
    elif kind == "llm" and judged:
        from tarl_jax.judge import llm as llm_judge
        # judge.llm.repeats > 1: the reward uses the majority vote of the repeats.
        found, runs, stats = llm_judge.judge_repeated(
            [(tasks[i], episodes[i]) for i in judged],
            {k: (None if v == "" else v) for k, v in config.judge.llm.items()})
        for i, j in zip(judged, found):
            judgements[i] = j  # None: dropped by the configured fallback, outcome-only reward
        metrics.update({f"judge/{k}": float(v) for k, v in stats.items()
                        if isinstance(v, (int, float))})
        if len(runs) > 1:
            rep = reliability.repeat_variance(runs, [outcomes[i] for i in judged], dict(config.reward))
            metrics.update({f"judge/repeat_{k}": float(v) for k, v in rep.items()
                            if v is not None and k != "repeats"})
        # The rule judge as a free yardstick: how far does the LLM judge agree with it? Only the
        # LLM's own verdicts count (a fallback *is* the rule judge's and would read as agreement).
        own = [i for i in judged if judgements[i] is not None
               and "fallback_from" not in judgements[i].meta]
        if own:
            agree = reliability.judge_agreement(
                [judgements[i] for i in own], [rule_judge.judge(tasks[i], episodes[i]) for i in own])
            for key in ("turn_exact_agreement", "turn_kappa", "neg_presence_agreement"):
                if agree[key] is not None:
                    metrics[f"judge/llm_vs_rule/{key}"] = float(agree[key])
    w = dict(config.reward)
    rewards, per_turn = [], []
    for ep, j, o in zip(episodes, judgements, outcomes):
        scores = j.scores if j is not None else [0] * len(ep.agent_turns)
        if j is None:  # outcome only (plain GRPO; math)
            rewards.append(w["w_out"] * o)
            per_turn.append([w["w_out"] * o / max(len(scores), 1)] * max(len(scores), 1))
        else:
            rewards.append(judge_reward.trajectory_reward(scores, o, w))
            per_turn.append(judge_reward.turn_rewards(scores, o, w))
    k = max(len(r) for r in per_turn)
    turn_r = np.zeros((len(episodes), k), np.float32)
    for i, r in enumerate(per_turn):
        turn_r[i, :len(r)] = r
    metrics.update({"outcome": float(np.mean(outcomes)), "reward": float(np.mean(rewards))})
    metrics.update(behaviour(episodes, tasks, judgements if kind == "rule" else None))
    judged = [j for j in judgements if j is not None]
    if judged:
        agree = reliability.outcome_agreement(judgements, outcomes)
        metrics.update({"judge/neg_rate": float(np.mean([-1 in j.scores for j in judged])),
                        "judge/mean_score": float(np.mean([np.mean(j.scores) for j in judged]))})
        for key in ("p_fail_given_neg", "p_clean_given_success", "accuracy"):
            if agree[key] is not None:
                metrics[f"judge/{key}"] = agree[key]
    return np.asarray(rewards, np.float32), turn_r, metrics


def behaviour(episodes, tasks, rule_judgements=None) -> dict:
    """What the agent did, by the rule judge's yardstick whatever judge the reward uses (so an
    outcome-only run is comparable): per tool episode, the share with a -1 and the mean count of
    writes no gold action asks for and of transfers the gold actions do not make."""
    idx = [i for i, ep in enumerate(episodes) if ep.mode != "math" and ep.agent_turns]
    if not idx:
        return {}
    js = [rule_judgements[i] if rule_judgements and rule_judgements[i] is not None
          else rule_judge.judge(tasks[i], episodes[i]) for i in idx]
    return {"behaviour/rule_neg_rate": float(np.mean([-1 in j.scores for j in js])),
            "behaviour/unrequested_writes": float(np.mean([j.meta["offences"].count("unrequested_write")
                                                           for j in js])),
            "behaviour/needless_transfers": float(np.mean([j.meta["offences"].count("transfer")
                                                           for j in js]))}
