"""Entry point: `python -m tarl_jax.main --config=configs/tiny.py --workdir=DIR [--config.x=y]`.

Modes (`--config.mode=`): train (default; resumes from DIR's latest checkpoint), eval (pass^k of
the latest checkpoint on the held-out tasks). On a multi-host slice every host runs this same
command; `--multihost` initialises JAX's multi-controller runtime first.
"""
from __future__ import annotations

import json
import logging

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/tiny.py", "an ml_collections config file",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/tiny", "checkpoints, metrics.jsonl, TensorBoard, plots")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (TPU pods, SLURM)")
flags.DEFINE_string("coordinator", "", "host:port of process 0 (empty: detect, e.g. TPU/SLURM)")
flags.DEFINE_integer("num_processes", 0, "with --coordinator: how many processes")
flags.DEFINE_integer("process_id", -1, "with --coordinator: this process's index")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # Orbax logs every file it writes at INFO through absl; keep the console for our own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("tarl_jax")
    ours.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours.addHandler(handler)
    ours.propagate = False
    if FLAGS.multihost:
        from tarl_jax import distributed
        distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    from tarl_jax import trainer
    t = trainer.Trainer(config, FLAGS.workdir)
    if config.mode == "train":
        _, meta = t.run()
        if jax.process_index() == 0:
            print(json.dumps({"evals": meta["evals"], "warmstart": meta.get("warmstart")}, indent=1))
    elif config.mode == "eval":
        state, _ = t.init_or_restore()
        print(json.dumps(t.evaluate(state), indent=1))
    else:
        raise app.UsageError(f"--config.mode={config.mode!r}: choose train | eval")


if __name__ == "__main__":
    app.run(main)
