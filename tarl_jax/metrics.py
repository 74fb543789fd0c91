"""Reporting: metrics.jsonl + TensorBoard, progress bars (process 0 only), the reward plot."""
from __future__ import annotations

import json
import pathlib

import jax


class MetricWriter:
    """metrics.jsonl (always) + TensorBoard event files (tensorboardX, no TensorFlow)."""

    def __init__(self, workdir: pathlib.Path):
        from tensorboardX import SummaryWriter
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(workdir / "tb"))

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


def plot(meta: dict, path: pathlib.Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hist, evals = meta["history"], meta["evals"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([h["step"] for h in hist], [h["reward"] for h in hist], label="reward (TARL)")
    ax[0].plot([h["step"] for h in hist], [10 * h["outcome"] for h in hist], label="10 x outcome")
    ax[0].set_xlabel("RL step")
    ax[0].legend()
    ax[1].plot([e["step"] for e in evals], [e["pass^1"] for e in evals], "o-")
    ax[1].set_xlabel("RL step")
    ax[1].set_ylabel("held-out pass^1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
