"""How far to trust a judge: agreement with the verifiable outcome, with another judge, with itself.

A -1 claims "this trajectory contains a decisive mistake", so against the outcome we report the
2x2 table (-1 present or not) x (failed or succeeded), P(fail | -1), P(no -1 | success) and
P(-1 | fail). Between two judges: per-turn exact agreement, Cohen's kappa over the three scores,
agreement on whether a trajectory has a -1, and on where it is when both put one. Against itself
(`--repeats R`: the LLM judge scores each trajectory R times): variance of each turn's score and
of the TARL reward over the repeats, how often the -1 (its presence, or its turn) changes between
repeats, and exact agreement of the turn scores between every two repeats. With repeats, the
verdict reported against the outcome and the other judge is the majority vote
(`llm.majority_vote`), the one the trainer's reward uses.

    python -m tarl_jax.judge.reliability --episodes FILE.jsonl [--tasks TASKS.json]
        [--judge rule] [--judge llm --llm model=gpt-4.1 --llm base_url=http://... --repeats 3]
        [--json REPORT.json]

FILE.jsonl holds Episode lines (tarl_jax.sandbox.record; `--tasks` is required, a v1 task list
or a tau2 tasks.json read by tarl_jax.sandbox.tasks, joined on task_id) or tau-bench trajectory lines
(`messages`, `task` = index into the task list, `reward`), like
taubench/v1/trajectories/airline_gpt-4o.jsonl; for those `--tasks` defaults to
`<dir>/../<domain>/tasks_test.json` with the domain the file name's prefix.
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import sys
from typing import Any, Sequence

from tarl_jax.judge import rules
from tarl_jax.judge.base import Judgement
from tarl_jax.judge.reward import trajectory_reward
from tarl_jax.sandbox.record import Episode
from tarl_jax.sandbox.tasks import Task, load_tasks


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def outcome_agreement(judgements: Sequence[Judgement | None], outcomes: Sequence[float]) -> dict:
    """Does a -1 go with failure? outcome >= 1 counts as success. Dropped (None) are skipped."""
    table = {"neg_fail": 0, "neg_success": 0, "clean_fail": 0, "clean_success": 0}
    for j, o in zip(judgements, outcomes, strict=True):
        if j is not None:
            table[("neg_" if -1 in j.scores else "clean_") + ("success" if o >= 1 else "fail")] += 1
    neg, clean = table["neg_fail"] + table["neg_success"], table["clean_fail"] + table["clean_success"]
    fail, success = table["neg_fail"] + table["clean_fail"], table["neg_success"] + table["clean_success"]
    return {"table": table, "n": neg + clean,
            "p_fail_given_neg": _ratio(table["neg_fail"], neg),
            "p_clean_given_success": _ratio(table["clean_success"], success),
            "p_neg_given_fail": _ratio(table["neg_fail"], fail),
            "accuracy": _ratio(table["neg_fail"] + table["clean_success"], neg + clean)}


def cohen_kappa(a: Sequence[int], b: Sequence[int], labels=(-1, 0, 1)) -> float | None:
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum((a.count(k) / n) * (b.count(k) / n) for k in labels)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def judge_agreement(ja: Sequence[Judgement | None], jb: Sequence[Judgement | None]) -> dict:
    """Agreement of two judges on the same trajectories. Pairs where either side was dropped
    or fell back (a fallback is the rule judge's verdict: against the rule judge it would read
    as perfect agreement) are skipped and counted."""
    def own(j):
        return j is not None and "fallback_from" not in j.meta

    pairs = [(a, b) for a, b in zip(ja, jb, strict=True) if own(a) and own(b)]
    for a, b in pairs:
        if len(a.scores) != len(b.scores):
            raise ValueError(f"judges scored {len(a.scores)} vs {len(b.scores)} turns of one trajectory")
    sa = [s for a, _ in pairs for s in a.scores]
    sb = [s for _, b in pairs for s in b.scores]
    both_neg = [(a, b) for a, b in pairs if -1 in a.scores and -1 in b.scores]
    confusion = {f"{x}|{y}": sum(1 for p, q in zip(sa, sb) if (p, q) == (x, y))
                 for x in (-1, 0, 1) for y in (-1, 0, 1)}
    return {"trajectories": len(pairs), "skipped": len(ja) - len(pairs), "turns": len(sa),
            "turn_exact_agreement": _ratio(sum(x == y for x, y in zip(sa, sb)), len(sa)),
            "turn_kappa": cohen_kappa(sa, sb),
            "neg_presence_agreement": _ratio(sum((-1 in a.scores) == (-1 in b.scores)
                                                 for a, b in pairs), len(pairs)),
            "neg_same_turn_when_both": _ratio(sum(a.negative_turn == b.negative_turn
                                                  for a, b in both_neg), len(both_neg)),
            "confusion_a|b": confusion}


def repeat_variance(runs: Sequence[Sequence[Judgement | None]], outcomes: Sequence[float],
                    reward_cfg=None) -> dict:
    """Self-consistency over repeated judging: runs[k][i] is repeat k of trajectory i.

    Only the judge's own verdicts count: dropped ones (None) and fallbacks (another judge's,
    meta["fallback_from"]) are left out, else a judge that never answers validly would look
    perfectly consistent; trajectories with fewer than two left are skipped. Variances are population
    variances over a trajectory's repeats (per turn, then averaged over all turns; of the reward,
    averaged over trajectories). A flip: the repeats disagree on whether there is a -1
    (presence) or on which turn it is, "none" included (turn). Pair agreement: over every two
    repeats of a trajectory and every turn, the fraction of equal scores."""
    turn_vars, reward_vars, presence_flips, turn_flips, n = [], [], 0, 0, 0
    pair_equal = pair_total = 0
    for i, o in enumerate(outcomes):
        reps = [run[i] for run in runs if run[i] is not None and "fallback_from" not in run[i].meta]
        if len(reps) < 2:
            continue
        if len({len(j.scores) for j in reps}) > 1:
            raise ValueError(f"trajectory {i}: repeats scored {[len(j.scores) for j in reps]} turns")
        n += 1
        turn_vars += [statistics.pvariance(col) for col in zip(*(j.scores for j in reps))]
        reward_vars.append(statistics.pvariance([trajectory_reward(j.scores, o, reward_cfg)
                                                 for j in reps]))
        presence_flips += len({-1 in j.scores for j in reps}) > 1
        turn_flips += len({j.negative_turn for j in reps}) > 1
        for a, b in itertools.combinations(reps, 2):
            pair_equal += sum(x == y for x, y in zip(a.scores, b.scores))
            pair_total += len(a.scores)
    return {"repeats": len(runs), "trajectories": n,
            "turn_score_var_mean": statistics.fmean(turn_vars) if turn_vars else None,
            "reward_var_mean": statistics.fmean(reward_vars) if reward_vars else None,
            "neg_presence_flip_rate": _ratio(presence_flips, n),
            "neg_turn_flip_rate": _ratio(turn_flips, n),
            "pair_exact_agreement": _ratio(pair_equal, pair_total)}


def reward_summary(judgements: Sequence[Judgement | None], outcomes: Sequence[float],
                   reward_cfg=None) -> dict:
    kept = [(j, o) for j, o in zip(judgements, outcomes, strict=True) if j is not None]
    rewards = [trajectory_reward(j.scores, o, reward_cfg) for j, o in kept]
    scores = [s for j, _ in kept for s in j.scores]

    def mean(xs):
        return statistics.fmean(xs) if xs else None
    return {"reward_mean": mean(rewards),
            "reward_mean_success": mean([r for r, (_, o) in zip(rewards, kept) if o >= 1]),
            "reward_mean_fail": mean([r for r, (_, o) in zip(rewards, kept) if o < 1]),
            "score_fractions": {str(k): _ratio(scores.count(k), len(scores)) for k in (-1, 0, 1)},
            "negative_kinds": _negative_kinds(kept),
            "fallbacks": sum(j.meta.get("fallback_from") is not None for j, _ in kept),
            "dropped": len(judgements) - len(kept)}


def _negative_kinds(kept) -> dict[str, dict[str, int]]:
    """Which rule put the -1 (judges that record meta["negative_kind"]), by outcome."""
    kinds: dict[str, dict[str, int]] = {}
    for j, o in kept:
        if j.meta.get("negative_kind"):
            row = kinds.setdefault(j.meta["negative_kind"], {"fail": 0, "success": 0})
            row["success" if o >= 1 else "fail"] += 1
    return kinds


def load_items(path: pathlib.Path, tasks_path: pathlib.Path | None = None,
               domain: str | None = None) -> list[tuple[Task, Any, float, str]]:
    """[(task, dialogue, outcome, name)] from Episode lines or tau-bench trajectory lines."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no episodes")
    first = json.loads(lines[0])
    is_episode = "turns" in first and "task_id" in first
    if is_episode:
        domain = domain or first["domain"]
    else:
        domain = domain or path.stem.split("_")[0]
        tasks_path = tasks_path or path.parent.parent / domain / "tasks_test.json"
    if tasks_path is None:
        raise ValueError(f"{path} holds Episode lines: pass --tasks to join them to their tasks")
    tasks = {t.task_id: t for t in load_tasks(tasks_path, domain)}
    items = []
    for k, line in enumerate(lines):
        if is_episode:
            ep = Episode.from_json(line)
            key, dialogue, outcome, name = ep.task_id, ep, ep.reward, f"{ep.task_id}#{k}"
        else:
            d = json.loads(line)
            key, dialogue, outcome = str(d["task"]), d["messages"], d["reward"]
            name = f"task{d['task']}/trial{d.get('trial', k)}"
        if key not in tasks:
            raise KeyError(f"{path} line {k + 1}: task {key!r} not in {tasks_path}")
        items.append((tasks[key], dialogue, float(outcome), name))
    return items


def _parse_override(s: str) -> tuple[str, Any]:
    key, _, value = s.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_judge(name: str, items, llm_cfg: dict):
    """(verdicts [Judgement | None], runs [R][N], stats or None) of judge `name` on items; the
    LLM judge judges each item llm_cfg["repeats"] times and its verdict is their majority vote."""
    if name == "rule":
        js = [rules.judge(task, dialogue) for task, dialogue, _, _ in items]
        return js, [js], None
    if name == "llm":
        from tarl_jax.judge import llm   # the openai client only when asked for
        return llm.judge_repeated([(t, d) for t, d, _, _ in items], llm_cfg)
    raise ValueError(f"unknown judge {name!r}; choose rule or llm")


def build_report(items, judges: Sequence[str], llm_cfg: dict | None = None, reward_cfg=None) -> dict:
    outcomes = [o for _, _, o, _ in items]
    report = {"episodes": len(items), "success_rate": statistics.fmean(outcomes), "judges": {}}
    verdicts = {}
    for name in judges:
        verdicts[name], runs, stats = run_judge(name, items, llm_cfg or {})
        entry = {"vs_outcome": outcome_agreement(verdicts[name], outcomes),
                 "rewards": reward_summary(verdicts[name], outcomes, reward_cfg)}
        if stats is not None:
            entry["stats"] = stats
        if len(runs) > 1:
            entry["self_consistency"] = repeat_variance(runs, outcomes, reward_cfg)
        report["judges"][name] = entry
    report["agreement"] = {f"{a}_vs_{b}": judge_agreement(verdicts[a], verdicts[b])
                           for a, b in itertools.combinations(verdicts, 2)}
    return report


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def format_report(report: dict) -> str:
    out = [f"episodes: {report['episodes']}  success rate: {_fmt(report['success_rate'])}"]
    for name, e in report["judges"].items():
        v, r, t = e["vs_outcome"], e["rewards"], e["vs_outcome"]["table"]
        out += [f"\n== judge {name}",
                "           fail  success",
                f"  has -1  {t['neg_fail']:5d}  {t['neg_success']:7d}",
                f"  no -1   {t['clean_fail']:5d}  {t['clean_success']:7d}",
                f"  P(fail | -1) = {_fmt(v['p_fail_given_neg'])}   "
                f"P(no -1 | success) = {_fmt(v['p_clean_given_success'])}   "
                f"P(-1 | fail) = {_fmt(v['p_neg_given_fail'])}   accuracy = {_fmt(v['accuracy'])}",
                "  scores: " + "  ".join(f"{k}: {_fmt(p)}" for k, p in r["score_fractions"].items()),
                f"  TARL reward mean {_fmt(r['reward_mean'])} (success {_fmt(r['reward_mean_success'])},"
                f" fail {_fmt(r['reward_mean_fail'])}); fallbacks {r['fallbacks']}, dropped {r['dropped']}"]
        if r["negative_kinds"]:
            out.append("  -1 kinds (fail/success): " + ", ".join(
                f"{k} {v['fail']}/{v['success']}" for k, v in sorted(r["negative_kinds"].items())))
        if e.get("stats"):
            out.append("  calls: " + ", ".join(f"{a}={_fmt(b)}" for a, b in e["stats"].items()))
        if "self_consistency" in e:
            out.append("  self-consistency: " + ", ".join(
                f"{a}={_fmt(b)}" for a, b in e["self_consistency"].items()))
    for pair, a in report["agreement"].items():
        out += [f"\n== {pair}",
                f"  {a['trajectories']} trajectories with both judges' own verdicts "
                f"({a['skipped']} skipped: dropped or fallen back)",
                f"  turns {a['turns']}: exact {_fmt(a['turn_exact_agreement'])}, "
                f"kappa {_fmt(a['turn_kappa'])}; -1 presence {_fmt(a['neg_presence_agreement'])}, "
                f"same -1 turn when both {_fmt(a['neg_same_turn_when_both'])}",
                f"  confusion (a|b): {a['confusion_a|b']}"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tarl_jax.judge.reliability",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", required=True, type=pathlib.Path)
    p.add_argument("--tasks", type=pathlib.Path)
    p.add_argument("--domain")
    p.add_argument("--judge", action="append", choices=["rule", "llm"],
                   help="repeat to compare judges (default: rule)")
    p.add_argument("--llm", action="append", default=[], metavar="KEY=VALUE",
                   help="LLM judge config override, e.g. model=gpt-4.1 (see llm.DEFAULTS)")
    p.add_argument("--repeats", type=int,
                   help="LLM judgings per trajectory (self-consistency); same as --llm repeats=R")
    p.add_argument("--json", type=pathlib.Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    items = load_items(args.episodes, args.tasks, args.domain)
    llm_cfg = dict(map(_parse_override, args.llm))
    if args.repeats is not None:
        llm_cfg["repeats"] = args.repeats
    report = build_report(items, args.judge or ["rule"], llm_cfg)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
