"""Reporting: metrics.jsonl + TensorBoard, progress bars (process 0 only), an evaluation's
figures, the run's summary and reward plot."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np

from tarl_jax.sandbox import reward as sandbox_reward


class _Compiles:
    """XLA compilations in this process, counted from jax.monitoring's backend-compile event
    (`COMPILES.count`, `.seconds`). A step that compiles after the first ones pays for a shape
    it has not seen (a new pack or sampler bucket) or for a retrace. A program loaded from a
    persistent compilation cache counts too (the event times the lookup), in less time."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds, self.names = 0, 0.0, []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, fun_name: str = "?", **_):
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration
            self.names.append(fun_name)


COMPILES = _Compiles()


class MetricWriter:
    """metrics.jsonl (always) + TensorBoard event files (tensorboardX, no TensorFlow).

    `resume_step`: the checkpoint the run resumes from. Rows after it (written before a crash,
    then lost with the uncommitted state) and a half-written last line are dropped, so the file
    holds exactly one row per step; TensorBoard is told to purge its events after that step.
    """

    def __init__(self, workdir: pathlib.Path, resume_step: int = 0):
        from tensorboardX import SummaryWriter
        path = workdir / "metrics.jsonl"
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        keep.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass   # a line cut by the crash
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
        self.jsonl = open(path, "a")
        self.tb = SummaryWriter(str(workdir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict):
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        self.jsonl.close()
        self.tb.close()


def progress(it, desc: str, **kw):
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, disable=jax.process_index() != 0, dynamic_ncols=True, **kw)


def eval_figures(trials: dict[str, list[float]], writes: set, kinds: dict | None = None) -> dict:
    """An evaluation's figures from {task id: [reward per sample]}: pass^1 over all tasks and
    per task; the headline counts tasks that need a write (`writes`), while tasks where doing
    nothing is right (answer a question, decline) get their own line: an agent that does
    nothing passes those. `kinds` ({task id: request kind}, e.g. the gold writes' tool names)
    adds pass^1 per kind: a mean over kinds hides a policy that solves one kind and no other,
    where RL has nothing to compare on the rest."""
    out = {"pass^1": sandbox_reward.pass_hat_k(trials, 1),
           "per_task": {t: float(np.mean([sandbox_reward.is_success(r) for r in rs]))
                        for t, rs in trials.items()},
           "write_tasks": sorted(writes & set(trials))}
    kinds = kinds or {}
    parts = [("writes", lambda t: t in writes), ("no_write", lambda t: t not in writes)]
    parts += [(f"kind/{k}", lambda t, k=k: kinds.get(t) == k)
              for k in sorted({kinds[t] for t in trials if t in kinds})]
    for name, keep in parts:
        part = {t: rs for t, rs in trials.items() if keep(t)}
        if part:
            out[f"pass^1/{name}"] = sandbox_reward.pass_hat_k(part, 1)
            out[f"tasks/{name}"] = len(part)
    return out


def request_kind(writes: list) -> str:
    """A task's request kind: its gold writes' tool names ("+" between distinct ones), or
    "none" where doing nothing is right."""
    return "+".join(dict.fromkeys(a.name for a in writes)) or "none"


def sampled_figures(sampled: dict[str, list[float]], writes: set, k: int) -> dict:
    """k samples per task: pass^1 and pass^k over the tasks that need a write, and every
    task's successes of k."""
    part = {t: rs for t, rs in sampled.items() if t in writes}
    return {"pass^1/sampled": sandbox_reward.pass_hat_k(part, 1),
            f"pass^{k}/sampled": sandbox_reward.pass_hat_k(part, k),
            "per_task_sampled": {t: int(sum(map(sandbox_reward.is_success, rs)))
                                 for t, rs in sampled.items()},
            "samples": k}


def _headline(ev: dict) -> tuple[str, float, int]:
    """(key, pass^1, tasks) of an evaluation's headline: tasks that need a write."""
    if "pass^1/writes" in ev:
        return "pass^1/writes", ev["pass^1/writes"], ev["tasks/writes"]
    return "pass^1", ev["pass^1"], len(ev.get("per_task", {})) or 1


def summary(meta: dict, workdir: pathlib.Path, split: str = "held-out") -> str:
    """What a run did, for a person: pass^1 on the evaluation split ("held-out", or
    "validation" for a run that tunes) before and after RL with 95% intervals, the paired
    difference on the same tasks, and where the evidence lies."""
    from tarl_jax import stats
    lines = []
    evals = meta.get("evals", [])
    if evals:
        first, last = evals[0], evals[-1]
        key, p0, n = _headline(first)
        _, p1, _ = _headline(last)
        lo0, hi0 = stats.wilson(p0 * n, n)
        lo1, hi1 = stats.wilson(p1 * n, n)
        what = "tasks needing a write" if key.endswith("writes") else "tasks"
        lines.append(f"{split} pass^1 on {n} {what} (greedy): step {first['step']} {p0:.3f} "
                     f"[{lo0:.3f}, {hi0:.3f}] -> step {last['step']} {p1:.3f} [{lo1:.3f}, {hi1:.3f}]"
                     " (95% Wilson)")
        if "per_task" in first and "per_task" in last:
            pool = first.get("write_tasks") or list(first["per_task"])
            ids = [t for t in pool if t in first["per_task"] and t in last["per_task"]]
            d = stats.paired_difference([first["per_task"][t] for t in ids],
                                        [last["per_task"][t] for t in ids])
            lines.append(f"paired difference: {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                         f"(95% paired t over {d['n']} tasks; {d['improved']} improved, "
                         f"{d['worsened']} worsened)")
        kinds = sorted(k[len("pass^1/kind/"):] for k in last if k.startswith("pass^1/kind/"))
        if len(kinds) > 1 and all(f"pass^1/kind/{k}" in first for k in kinds):
            lines.append("by request kind: " + ", ".join(
                f"{k} ({last[f'tasks/kind/{k}']}) {first[f'pass^1/kind/{k}']:.2f} -> "
                f"{last[f'pass^1/kind/{k}']:.2f}" for k in kinds))
        if "pass^1/no_write" in last:
            lines.append(f"tasks where doing nothing is right ({last['tasks/no_write']}): "
                         f"{first['pass^1/no_write']:.3f} -> {last['pass^1/no_write']:.3f}")
        lines.append("evaluations: " + ", ".join(f"step {e['step']} {_headline(e)[1]:.3f}"
                                                  for e in evals))
    phases = time_phases(meta.get("history", []))
    if phases:
        lines.append("time per RL step: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    ws = meta.get("warmstart")
    if ws:
        # A loaded file (warmstart.init) says where it came from; older or intermediate files
        # (warmstart.save_every before session 5's fix) carry only the last NLL.
        nll = (f"NLL {ws['nll_first']:.2f} -> {ws['nll_last']:.2f}" if "nll_first" in ws
               else f"NLL {ws['nll_last']:.2f}")
        lines.append(f"warm start: {nll}" + (f" on {ws['expert_solved']} expert dialogues"
                                             if "expert_solved" in ws else "")
                     + (f", loaded from {ws['init']}" if "init" in ws else ""))
    lines.append(f"plot {workdir / 'reward.png'}; checkpoints {workdir / 'checkpoints'}; "
                 f"episodes {workdir / 'episodes'}; metrics {workdir / 'metrics.jsonl'}")
    return "\n".join(lines)


PHASES = {"decode": "time/rollout_decode_s", "prefill": "time/rollout_prefill_s",
          "host (sandbox, user, rendering)": "time/rollout_host_s", "judge": "time/judge_s",
          "pack": "time/pack_s", "update": "time/update_s", "whole step": "time/step_s"}


def time_phases(history: list[dict]) -> dict[str, float]:
    """Mean seconds per RL step of each phase, over the steps after the first (which compiles);
    {} when the history has no such figures (the SFT control, an old run)."""
    rows = [h for h in history[1:] or history if all(k in h for k in PHASES.values())]
    return {name: float(np.mean([h[k] for h in rows])) for name, k in PHASES.items()} if rows else {}


def plot(meta: dict, path: pathlib.Path, split: str = "held-out"):
    """Training reward per RL step (and its running mean) beside pass^1 on the evaluation split
    with 95% Wilson intervals at every evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tarl_jax import stats
    hist, evals = meta["history"], meta["evals"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in hist]
    for key, scale, label in (("reward", 1.0, "reward (TARL)"), ("outcome", 10.0, "10 x outcome"),
                              ("sft/nll", 1.0, "SFT NLL (the control)")):
        if not hist or key not in hist[0]:
            continue
        y = np.array([scale * h[key] for h in hist])
        line, = ax[0].plot(steps, y, alpha=0.35, label=label)
        if len(y) >= 5:
            w = max(3, len(y) // 8)
            ax[0].plot(steps[w - 1:], np.convolve(y, np.ones(w) / w, "valid"), color=line.get_color(),
                       label=f"{label}, mean of {w}")
    ax[0].set_xlabel("RL step")
    ax[0].set_title("training batches")
    ax[0].legend(fontsize=7)
    if evals:
        key, _, n = _headline(evals[0])
        x = [e["step"] for e in evals]
        y = [_headline(e)[1] for e in evals]
        ci = np.array([stats.wilson(p * n, n) for p in y])
        ax[1].errorbar(x, y, yerr=[np.array(y) - ci[:, 0], ci[:, 1] - np.array(y)], fmt="o-",
                       capsize=3)
        ax[1].set_ylim(0, 1)
        ax[1].set_title(f"{split} pass^1, {n} tasks (95% Wilson)")
    ax[1].set_xlabel("RL step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
