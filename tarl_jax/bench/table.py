"""The paper's table in miniature: GRPO, GRPO + TARL (trajectory, per-turn, + math) and an SFT
control given the same wall time, over seeds, on 64 held-out tasks.

    python -m tarl_jax.bench.table --seeds=3 --out=runs/table   # configs/tiny.py:table
    python -m tarl_jax.bench.table ... -n             # print the commands, run nothing
    python -m tarl_jax.bench.table ... --aggregate    # only (re)write the table from OUT

Seed by seed: a 0-step run in OUT/start/seed=S loads the shipped warm start, evaluates it (greedy
pass^1, and 4 samples per task: pass^1 / pass^4 at the training temperature) and writes the
step-0 checkpoint every arm of the seed copies into OUT/<arm>/seed=S, so all arms start from one
policy and share its evaluation (a paired comparison). The RL arms run next; the control last,
SFT on the expert's dialogues (the warm start continued) for the RL arms' mean seconds per step
at every step, so its curve is on the same wall-time axis. Runs go one after another (`--jobs=N`:
N at a time, each pinned to its share of the cores, a run as soon as those it needs end); a finished
run (summary.json) is skipped and an interrupted one resumes from its latest checkpoint, so
re-running the command finishes a table. The runs share one persistent XLA compilation cache,
OUT/xla_cache (JAX_COMPILATION_CACHE_DIR, if set, wins). Arguments after the known ones (e.g.
`--config.rollout.temperature=0.7`) go to every run.

OUT/table.md (also printed) and OUT/curves.png: per arm, held-out pass^1 (greedy) after training
and its paired difference from the start and from the control, sampled pass^1 and pass^4, with 95%
intervals from a bootstrap over seeds and tasks (stats.cluster_bootstrap), and, over training,
the rule judge's -1 rate, malformed calls, needless writes and transfers per episode, gradient
norm and entropy. The smallest difference between two arms this budget detects (80% power, 5%
two-sided) is printed beneath.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from scipy import stats as sps

from tarl_jax import stats

# (workdir name, label, configs/tiny.py args): the arms of the table; the control is last.
ARMS = (
    ("grpo", "GRPO (outcome only)", "judge=none,credit=trajectory"),
    ("tarl_traj", "GRPO + TARL, trajectory", "judge=rule,credit=trajectory"),
    ("tarl_turn", "GRPO + TARL, per-turn", "judge=rule,credit=per_turn"),
    ("tarl_traj_math", "GRPO + TARL, trajectory + math", "judge=rule,credit=trajectory,math=0.25"),
    ("sft", "SFT control, same wall time", "control"),
)
CONTROL = "sft"
WALL_FILE = "table_wall.json"    # the driver's own record of a run's wall time
BUDGET_FILE = "sft_seconds.json"  # the control's seconds per step, fixed at its first start


def with_args(config: str, extra: str) -> str:
    """'configs/tiny.py:table' + 'judge=none' -> 'configs/tiny.py:table,judge=none'."""
    path, _, args = config.partition(":")
    return f"{path}:{','.join(a for a in (args, extra) if a)}"


def commands(config: str, out: pathlib.Path, seeds: int, extra: list[str]):
    """[(workdir, command)], seed by seed (a table cut short still has whole seeds): the seed's
    0-step start, then its arms. The control's command lacks rl.sft_seconds (run_all adds it)."""
    runs = []
    main = [sys.executable, "-m", "tarl_jax.main"]
    for seed in range(seeds):
        start = out / "start" / f"seed={seed}"
        runs.append((start, [*main, f"--config={config}", f"--config.seed={seed}", *extra,
                             "--config.total_steps=0", f"--workdir={start}"]))
        for name, _, args in ARMS:
            wd = out / name / f"seed={seed}"
            runs.append((wd, [*main, f"--config={with_args(config, args)}", f"--config.seed={seed}",
                              *extra, f"--workdir={wd}"]))
    return runs


def seconds_per_step(out: pathlib.Path, seed: int) -> float:
    """The RL arms' mean seconds per step for `seed` (rollouts, judge and update; evaluations
    excluded): the control's budget per step."""
    times = [r["time/step_s"] for name, _, _ in ARMS if name != CONTROL
             for r in history(out / name / f"seed={seed}")]
    if not times:
        raise ValueError(f"seed {seed}: no finished RL arm to take the control's budget from")
    return float(np.mean(times))


def _ready(out: pathlib.Path, workdir: pathlib.Path) -> bool:
    """A seed's arms wait for its start; its control for its RL arms (whose step times it takes)."""
    seed = workdir.name
    if workdir.parent.name == "start":
        return True
    if workdir.parent.name != CONTROL:
        return (out / "start" / seed / "summary.json").exists()
    return all((out / name / seed / "summary.json").exists() for name, _, _ in ARMS if name != CONTROL)


def _launch(out: pathlib.Path, workdir: pathlib.Path, cmd: list[str], cpus) -> tuple:
    seed = int(workdir.name.split("=", 1)[1])
    start = out / "start" / f"seed={seed}"
    if workdir != start and not (workdir / "checkpoints").exists():
        shutil.copytree(start / "checkpoints", workdir / "checkpoints")
    workdir.mkdir(parents=True, exist_ok=True)
    if workdir.parent.name == CONTROL:
        budget = workdir / BUDGET_FILE
        if not budget.exists():
            budget.write_text(json.dumps({"sft_seconds": seconds_per_step(out, seed)}))
        cmd = [*cmd, f"--config.rl.sft_seconds={json.loads(budget.read_text())['sft_seconds']}"]
    print(f"running {workdir}" + (f" on cpus {sorted(cpus)}" if cpus else ""), flush=True)
    log = open(workdir / "log.txt", "a")
    # Each job on its own cores: two one-core runs did ~1.3x the work of one two-core run on
    # this 2-core machine (level 1 compact: 93 s a step each, against 62 s alone; README).
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    # The runs share one persistent XLA cache: the same programs compile once a table, not in
    # every run (level 1 compact: 67-339 s of compiling in a run's steps, its compile/seconds).
    # A hit is the same executable (keys hash the program and options); an entry cut short by
    # a killed run costs a warning and a recompile.
    env = {"JAX_COMPILATION_CACHE_DIR": str(out / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **os.environ}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin, env=env)
    return workdir, cmd, proc, time.time(), log


def run_all(config: str, out: pathlib.Path, seeds: int, extra: list[str], dry: bool,
            jobs: int = 1) -> None:
    """Runs the table's runs, `jobs` at a time (each on its share of this process's cores),
    each as soon as what it depends on has finished; a failed run stops new launches and, once
    the running ones end, the driver."""
    runs = commands(config, out, seeds, extra)
    if dry:
        for _, cmd in runs:
            print(" ".join(cmd))
        return
    pending = []
    for workdir, cmd in runs:
        if (workdir / "summary.json").exists():
            print(f"done already: {workdir}")
        else:
            pending.append((workdir, cmd))
    cpus = sorted(os.sched_getaffinity(0))
    if jobs > len(cpus):
        raise ValueError(f"--jobs={jobs}: this process may use {len(cpus)} cpus")
    slots = [set(cpus[i::jobs]) for i in range(jobs)] if jobs > 1 else [None]
    running, failed, total = {}, [], len(pending)
    while (pending and not failed) or running:
        for slot, (workdir, cmd, proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[slot]
            if proc.returncode:
                failed.append(f"{' '.join(cmd)} failed ({proc.returncode}); see {workdir / 'log.txt'}")
                continue
            prev = json.loads((workdir / WALL_FILE).read_text()) if (workdir / WALL_FILE).exists() else {}
            (workdir / WALL_FILE).write_text(json.dumps(
                {"wall_s": prev.get("wall_s", 0.0) + time.time() - t0}))
            done = total - len(pending) - len(running)
            print(f"finished {workdir} in {(time.time() - t0) / 60:.1f} min ({done} of {total})",
                  flush=True)
        for slot in range(len(slots)):
            if slot in running or failed:
                continue
            nxt = next((r for r in pending if _ready(out, r[0])), None)
            if nxt is None:
                break
            pending.remove(nxt)
            running[slot] = _launch(out, *nxt, slots[slot])
        if pending and not running and not failed:
            raise SystemExit(f"nothing can run: {pending[0][0]} waits for a run that is not there")
        if running:
            time.sleep(1.0)
    if failed:
        raise SystemExit("\n".join(failed))


# ---------------------------------------------------------------------------- aggregation

def history(workdir: pathlib.Path) -> list[dict]:
    """A run's per-step metrics, the last record of each step (a resumed run rewrites the steps
    after its checkpoint)."""
    path = workdir / "metrics.jsonl"
    if not (workdir / "summary.json").exists() or not path.exists():
        return []
    steps = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec
    return [steps[s] for s in sorted(steps)]


def load_run(workdir: pathlib.Path) -> dict:
    """One finished run: {"evals": [(step, {task: 0/1 greedy})], "sampled": {task: successes},
    "samples": k, "tasks": headline task ids, "history": per-step metrics}."""
    summary = json.loads((workdir / "summary.json").read_text())
    evals = sorted(summary["evals"], key=lambda e: e["step"])
    if evals[0]["step"] != 0:
        raise ValueError(f"{workdir}: no evaluation before training (step 0) in summary.json")
    final = evals[-1]
    if "per_task_sampled" not in final:
        raise ValueError(f"{workdir}: the last evaluation has no samples (rollout.final_samples)")
    return {"evals": [(e["step"], e["per_task"]) for e in evals], "sampled": final["per_task_sampled"],
            "samples": final["samples"], "tasks": final.get("write_tasks") or sorted(final["per_task"]),
            "history": history(workdir)}


def _over(hist, key, part=slice(None)) -> float:
    """The mean of `key` over the `part` of the tool-task steps (math batches left out)."""
    vals = [h[key] for h in [h for h in hist if not h.get("math_batch")][part] if key in h]
    return float(np.mean(vals)) if vals else float("nan")


def aggregate(out: pathlib.Path, last: int, reps: int = 10000) -> dict:
    """Every arm's figures over the seeds every arm (and the start) finished."""
    seeds = sorted({p.parent.name for p in (out / "start").glob("seed=*/summary.json")})
    runs = {name: {s: out / name / s for s in seeds if (out / name / s / "summary.json").exists()}
            for name, _, _ in ARMS}
    seeds = [s for s in seeds if all(s in r for r in runs.values())]
    if not seeds:
        raise SystemExit(f"{out}: no seed has finished every arm yet")
    start = {s: load_run(out / "start" / s) for s in seeds}
    loaded = {name: {s: load_run(runs[name][s]) for s in seeds} for name, _, _ in ARMS}
    tasks = start[seeds[0]]["tasks"]
    k = start[seeds[0]]["samples"]

    def greedy(run, at=-1):
        return [run["evals"][at][1][t] for t in tasks]

    # [seeds, tasks] arrays; the same bootstrap seed resamples the same seeds and tasks for all.
    before = np.array([greedy(start[s]) for s in seeds])
    before_k = np.array([[start[s]["sampled"][t] for t in tasks] for s in seeds], float)
    boot = lambda x: stats.cluster_bootstrap(x, reps)   # noqa: E731
    arms, curves = [], {}
    control = np.array([greedy(loaded[CONTROL][s]) for s in seeds])
    for name, label, _ in ARMS:
        by_seed = loaded[name]
        after = np.array([greedy(by_seed[s]) for s in seeds])
        succ = np.array([[by_seed[s]["sampled"][t] for t in tasks] for s in seeds], float)
        hists = [by_seed[s]["history"] for s in seeds]
        row = {"name": name, "label": label, "seeds": len(seeds),
               "after": (after.mean(), *boot(after)[:2]),
               "vs_start": (np.mean(after - before), *boot(after - before)),
               "vs_control": (np.mean(after - control), *boot(after - control)),
               "sampled1": (np.mean(succ / k), *boot(succ / k)[:2]),
               f"sampled{k}": (np.mean(succ == k), *boot((succ == k).astype(float))[:2])}
        for key, metric, part in (
                ("outcome", "outcome", slice(-last, None)),
                ("neg_rate", "behaviour/rule_neg_rate", slice(-last, None)),
                ("malformed", "rollout/malformed", slice(-last, None)),
                ("writes", "behaviour/unrequested_writes", slice(-last, None)),
                ("transfers", "behaviour/needless_transfers", slice(-last, None)),
                ("grad_norm", "grad_norm", slice(None)),
                ("entropy_first", "entropy", slice(0, last)),
                ("entropy_last", "entropy", slice(-last, None))):
            vals = np.array([_over(h, metric, part) for h in hists])
            row[key] = (float(np.mean(vals)), float(np.std(vals)))
        row["grad_norm_max"] = float(max((h.get("grad_norm", 0.0) for hs in hists for h in hs),
                                         default=float("nan")))
        row["step_s"] = float(np.mean([h["time/step_s"] for hs in hists for h in hs]))
        arms.append(row)
        steps = [st for st, _ in by_seed[seeds[0]]["evals"]]
        curves[name] = {"label": label, "eval_steps": steps,
                        "pass1": [float(np.mean([[by_seed[s]["evals"][i][1][t] for t in tasks]
                                                 for s in seeds])) for i in range(len(steps))],
                        "outcome": _mean_curve(hists, "outcome"),
                        "entropy": _mean_curve(hists, "entropy")}
    # Smallest difference between two arms this budget detects: the typical standard error of
    # an arm-to-arm difference of pass^1 after training, times z_0.975 + z_0.8.
    ses = [stats.cluster_bootstrap(
        np.array([greedy(loaded[a][s]) for s in seeds]) - np.array([greedy(loaded[b][s]) for s in seeds]),
        reps)[2] for i, (a, _, _) in enumerate(ARMS) for b, _, _ in ARMS[i + 1:]]
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    return {"arms": arms, "curves": curves, "seeds": seeds, "tasks": len(tasks), "samples": k,
            "start": {"pass1": (before.mean(), *boot(before)[:2]),
                      "sampled1": (np.mean(before_k / k), *boot(before_k / k)[:2]),
                      f"sampled{k}": (np.mean(before_k == k),
                                      *boot((before_k == k).astype(float))[:2])},
            "detectable": float(z * np.median(ses)), "last": last}


def _mean_curve(hists, key) -> list:
    """Per step, the seeds' mean of `key` (NaN on steps without it: math batches, the control)."""
    n = min(len(h) for h in hists)
    return [float(np.mean([h[i][key] if key in h[i] and not h[i].get("math_batch") else np.nan
                           for h in hists])) for i in range(n)]


def markdown(agg: dict) -> str:
    k, last = agg["samples"], agg["last"]

    def ci(v, d=3):
        return f"{v[0]:.{d}f} [{v[1]:.{d}f}, {v[2]:.{d}f}]"

    def diff(v):
        return f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"

    def sd(v, d=2):
        return "—" if np.isnan(v[0]) else f"{v[0]:.{d}f} ± {v[1]:.{d}f}"

    head = ["arm", "pass^1 after", "minus start", "minus control", "sampled pass^1",
            f"sampled pass^{k}", "train success", "rule -1 rate", "malformed / ep",
            "needless writes / ep", "transfers / ep", "grad norm (max)", "entropy first -> last",
            "s / step"]
    s = agg["start"]
    lines = [f"Held-out: {agg['tasks']} tasks that need a write; {len(agg['seeds'])} seeds "
             f"({', '.join(agg['seeds'])}). Start (every arm's): pass^1 "
             f"{ci(s['pass1'])}, sampled pass^1 {ci(s['sampled1'])}, pass^{k} {ci(s[f'sampled{k}'])}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in agg["arms"]:
        ctrl = "(control)" if r["name"] == CONTROL else diff(r["vs_control"])
        lines.append("| " + " | ".join([
            r["label"], ci(r["after"]), diff(r["vs_start"]), ctrl, ci(r["sampled1"]),
            ci(r[f"sampled{k}"]), sd(r["outcome"]), sd(r["neg_rate"]), sd(r["malformed"]),
            sd(r["writes"]), sd(r["transfers"]),
            f"{sd(r['grad_norm'], 3)} ({r['grad_norm_max']:.2f})",
            f"{sd(r['entropy_first'], 3)} -> {sd(r['entropy_last'], 3)}",
            f"{r['step_s']:.1f}"]) + " |")
    lines += ["", f"pass^1 after: greedy, at the last step; sampled: {k} episodes per task at the "
              "training temperature. Intervals: 95% percentile bootstrap over seeds and tasks "
              "(differences paired: the same seeds and tasks). Training columns: mean ± std over "
              f"seeds of the last {last} tool-task steps (grad norm: every step; entropy: first "
              f"and last {last}); — where an arm has no such figure (the control samples nothing).",
              f"Smallest arm-to-arm difference of pass^1 this budget detects (80% power, 5% "
              f"two-sided): {agg['detectable']:.3f}. Differences inside it are not findings."]
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    w = 5   # training success is noisy step to step (16 tasks a step): a running mean
    for name, c in agg["curves"].items():
        line, = ax[0].plot(c["eval_steps"], c["pass1"], "o-", label=c["label"])
        for i, key, width in ((1, "outcome", w), (2, "entropy", 1)):
            y = np.array(c[key])
            x = np.arange(1, len(y) + 1)[~np.isnan(y)]
            y = y[~np.isnan(y)]
            if len(y) >= width:
                ax[i].plot(x[width - 1:], np.convolve(y, np.ones(width) / width, "valid"),
                           color=line.get_color())
    titles = (f"held-out pass^1 (greedy, {agg['tasks']} tasks; mean over seeds: "
              f"{len(agg['seeds'])})", f"training success (sampled; mean of {w} steps)",
              "entropy, nats / token (the control's: on expert tokens)")
    for a, t in zip(ax, titles):
        a.set_title(t, fontsize=9)
        a.set_xlabel("step (equal wall time per step for every arm)")
    ax[0].set_ylim(0, 1)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.py:table")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/table")
    p.add_argument("--last", type=int, default=5, help="steps the training columns average")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each pinned to its share of the cores (2 on 2 cores: ~1.3x)")
    p.add_argument("-n", "--dry-run", action="store_true")
    p.add_argument("--aggregate", action="store_true", help="only write the table")
    args, extra = p.parse_known_args(argv)
    if args.seeds < 1 or args.last < 1 or args.jobs < 1:
        p.error("--seeds, --last and --jobs must be >= 1")
    out = pathlib.Path(args.out)
    if not args.aggregate:
        run_all(args.config, out, args.seeds, extra, args.dry_run, args.jobs)
    if args.dry_run:
        return
    agg = aggregate(out, args.last)
    table = markdown(agg)
    (out / "table.md").write_text(table)
    plot(agg, out / "curves.png")
    print(table + f"\ncurves: {out / 'curves.png'}")


if __name__ == "__main__":
    main()
