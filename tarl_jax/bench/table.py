"""The paper's table in miniature: plain GRPO vs GRPO + TARL (trajectory, per-turn, + math), seeds.

    python -m tarl_jax.bench.table --config=configs/tiny.py:table --seeds=3 --out=runs/table
    python -m tarl_jax.bench.table ... -n             # print the commands, run nothing
    python -m tarl_jax.bench.table ... --aggregate    # only (re)write the table from OUT

Each seed's warm start (SFT on the expert's dialogues, then pass^1 before RL) runs once, in
OUT/warmstart/seed=S, and its step-0 checkpoint is copied into every variant's workdir
OUT/<variant>/seed=S: the variants of a seed start RL from the same policy (a paired comparison)
and the warm start is paid once per seed, not four times (`--shared-warmstart`: once in all,
seed 0's, so seeds vary only RL's sampling and task order). The trainer resumes from that copy as
from its own checkpoint (everything random is a function of (seed, step)), and no variant's
config touches what the warm start computes. Runs go one after another; a run whose summary.json
exists is skipped and an interrupted one resumes from its latest checkpoint, so re-running the
command finishes a table. Arguments after the known ones (e.g. `--config.rollout.temperature=0.7`)
go to every run. The table (OUT/table.md, also printed) gives mean ± std over seeds (numpy's
population std, ddof=0) of held-out pass^1 before / after RL and, over the last k tool-task RL
steps (math batches left out), training outcome (the train-set success rate), reward and the
judge's -1 rate, the share of RL steps with a non-zero gradient, plus seconds per RL step and the wall time of a run (shared CPU: indicative).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

# (workdir name, label, config args): the judge/credit/math settings of each column of the table.
VARIANTS = (
    ("grpo", "GRPO (outcome only)", "judge=none"),
    ("tarl_traj", "GRPO + TARL, trajectory", "judge=rule,credit=trajectory"),
    ("tarl_turn", "GRPO + TARL, per-turn", "judge=rule,credit=per_turn"),
    ("tarl_traj_math", "GRPO + TARL, trajectory + math", "judge=rule,credit=trajectory,math=0.25"),
)
WALL_FILE = "table_wall.json"   # the driver's own record of a run's wall time


def with_args(config: str, extra: str) -> str:
    """'configs/tiny.py:table' + 'judge=none' -> 'configs/tiny.py:table,judge=none'."""
    path, _, args = config.partition(":")
    return f"{path}:{','.join(a for a in (args, extra) if a)}"


def warmstart_dir(out: pathlib.Path, seed: int, shared: bool) -> pathlib.Path:
    return out / "warmstart" / f"seed={0 if shared else seed}"


def commands(config: str, out: pathlib.Path, seeds: int, extra: list[str], shared: bool = False):
    """[(workdir, command)], seed by seed (a table cut short still has whole seeds): the warm
    start of a seed (only seed 0's when `shared`), then its variants."""
    runs = []
    for seed in range(seeds):
        main = [sys.executable, "-m", "tarl_jax.main"]
        ws = warmstart_dir(out, seed, shared)
        if seed == 0 or not shared:
            runs.append((ws, [*main, f"--config={config}", f"--config.seed={seed}", *extra,
                              "--config.total_steps=0", f"--workdir={ws}"]))
        for name, _, args in VARIANTS:
            wd = out / name / f"seed={seed}"
            runs.append((wd, [*main, f"--config={with_args(config, args)}", f"--config.seed={seed}",
                              *extra, f"--workdir={wd}"]))
    return runs


def run_all(config: str, out: pathlib.Path, seeds: int, extra: list[str], dry: bool,
            shared: bool = False) -> None:
    for workdir, cmd in commands(config, out, seeds, extra, shared):
        if dry:
            print(" ".join(cmd))
            continue
        if (workdir / "summary.json").exists():
            print(f"done already: {workdir}")
            continue
        if workdir.parent.name != "warmstart" and not (workdir / "checkpoints").exists():
            ws = warmstart_dir(out, int(workdir.name.split("=", 1)[1]), shared)
            for part in ("checkpoints", "reference"):   # reference: the KL anchor, if kept
                if (ws / part).exists():
                    shutil.copytree(ws / part, workdir / part)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"running {workdir}", flush=True)
        t0 = time.time()
        with open(workdir / "log.txt", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {workdir / 'log.txt'}")
        prev = json.loads((workdir / WALL_FILE).read_text()) if (workdir / WALL_FILE).exists() else {}
        (workdir / WALL_FILE).write_text(json.dumps(
            {"wall_s": prev.get("wall_s", 0.0) + time.time() - t0}))


# ---------------------------------------------------------------------------- aggregation

def run_stats(workdir: pathlib.Path, last: int) -> dict:
    """One finished run's numbers (NaN where a run has no such metric, e.g. no judge)."""
    summary = json.loads((workdir / "summary.json").read_text())
    steps = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec   # a resumed run rewrites the steps after its checkpoint
    hist = [steps[s] for s in sorted(steps)]
    tool = [h for h in hist if not h.get("math_batch")][-last:]
    if not tool:
        raise ValueError(f"{workdir}: no tool-task RL step in metrics.jsonl")
    evals = sorted(summary["evals"], key=lambda e: e["step"])
    if evals[0]["step"] != 0:
        raise ValueError(f"{workdir}: no evaluation before RL (step 0) in summary.json")

    def mean(key):
        vals = [h[key] for h in tool if key in h]
        return float(np.mean(vals)) if vals else float("nan")

    wall = workdir / WALL_FILE
    return {"before": evals[0]["pass^1"], "after": evals[-1]["pass^1"],
            "outcome": mean("outcome"), "reward": mean("reward"), "neg_rate": mean("judge/neg_rate"),
            # Share of RL steps that changed the policy: a group whose samples all score alike
            # has zero advantages, and a step of such groups no gradient.
            "updates": float(np.mean([h["grad_norm"] > 0 for h in hist])),
            "step_s": float(np.mean([h["time/step_s"] for h in hist])),
            "wall_s": json.loads(wall.read_text())["wall_s"] if wall.exists() else float("nan")}


COLUMNS = (("before", "pass^1 before", 3), ("after", "pass^1 after", 3),
           ("outcome", "train outcome", 3), ("reward", "reward", 2),
           ("neg_rate", "judge -1 rate", 2), ("updates", "steps with a gradient", 2),
           ("step_s", "s / RL step", 1),
           ("wall_s", "wall s / run", 0))


def aggregate(out: pathlib.Path, last: int) -> list[dict]:
    """Per variant: the finished seeds and mean / std over them of every column."""
    rows = []
    for name, label, _ in VARIANTS:
        runs = sorted((out / name).glob("seed=*/summary.json"), key=lambda p: p.parent.name)
        stats = [run_stats(p.parent, last) for p in runs]
        row = {"variant": label, "seeds": [p.parent.name.split("=", 1)[1] for p in runs]}
        for key, _, _ in COLUMNS:
            vals = np.array([s[key] for s in stats], float)
            row[key] = (float(np.mean(vals)), float(np.std(vals))) if len(vals) else (np.nan, np.nan)
        row["runs"] = stats
        rows.append(row)
    return rows


def markdown(rows: list[dict], last: int) -> str:
    def cell(mean, std, digits):
        return "—" if np.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    head = ["variant", "seeds", *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["variant"], str(len(r["seeds"])),
                                        *(cell(*r[k], d) for k, _, d in COLUMNS)]) + " |")
    lines.append(f"\nmean ± std over seeds (ddof=0); train outcome, reward and judge -1 rate over "
                 f"the last {last} tool-task RL steps; reward is 10 x outcome without a judge.")
    lines.append("\nPer run (seed: pass^1 before -> after, train outcome):")
    for r in rows:
        runs = ", ".join(f"{s}: {x['before']:.3f} -> {x['after']:.3f}, {x['outcome']:.2f}"
                         for s, x in zip(r["seeds"], r["runs"]))
        lines.append(f"- {r['variant']}: {runs or 'no finished run'}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.py:table")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/table")
    p.add_argument("--shared-warmstart", action="store_true",
                   help="every seed starts RL from seed 0's warm start (seeds vary RL only)")
    p.add_argument("--last", type=int, default=4, help="RL steps the training columns average")
    p.add_argument("-n", "--dry-run", action="store_true")
    p.add_argument("--aggregate", action="store_true", help="only write the table")
    args, extra = p.parse_known_args(argv)
    if args.seeds < 1 or args.last < 1:
        p.error("--seeds and --last must be >= 1")
    out = pathlib.Path(args.out)
    if not args.aggregate:
        run_all(args.config, out, args.seeds, extra, args.dry_run, args.shared_warmstart)
    if args.dry_run:
        return
    table = markdown(aggregate(out, args.last), args.last)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
