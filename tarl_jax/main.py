"""Entry point: `python -m tarl_jax.main --config=configs/tiny.py --workdir=DIR [--config.x=y]`.

Modes (`--config.mode=`): train (default; resumes from DIR's latest checkpoint), eval (pass^k of
the latest checkpoint on the held-out tasks), serve (the latest checkpoint's policy behind an
OpenAI-compatible endpoint, `--port`, for tau-bench's own harness or a local judge/user),
warmstart (SFT on the training split's expert dialogues only, written to `--warmstart_out`: the
file `warmstart.init` starts a run from). On a multi-host slice every host runs this same
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
flags.DEFINE_string("host", "127.0.0.1", "serve mode: address to bind")
flags.DEFINE_integer("port", 8000, "serve mode: port")
flags.DEFINE_string("warmstart_out", "warmstart.safetensors",
                    "warmstart mode: where to write the warm-started policy")
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
    if config.mode == "serve":
        return serve(config)
    t = trainer.Trainer(config, FLAGS.workdir)
    if config.mode == "train":
        _, meta = t.run()
        if jax.process_index() == 0:
            from tarl_jax import metrics
            print(metrics.summary(meta, t.workdir), flush=True)
    elif config.mode == "warmstart":
        # Writes the warm start a run can begin from (warmstart.init): `--warmstart_out`.
        meta = t.save_warm_start(FLAGS.warmstart_out)
        print(json.dumps({"path": FLAGS.warmstart_out, **meta["sft"],
                          "seconds": round(meta["seconds"], 1)}), flush=True)
    elif config.mode == "eval":
        state, _ = t.init_or_restore(resume_curriculum=False)
        print(json.dumps(t.evaluate(state), indent=1))
    else:
        raise app.UsageError(f"--config.mode={config.mode!r}: choose train | eval | serve | "
                             "warmstart")


def serve(config):
    """The config's model with the workdir's latest trained policy (if any) behind the server."""
    from tarl_jax import components, serve as serve_lib, sharding
    from tarl_jax.rl import checkpoint
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    trained = checkpoint.Checkpointer.exists(FLAGS.workdir)
    tok, cfg, params = components.load_model(
        {**config.model, "orbax": FLAGS.workdir if trained else ""}, mesh, sharding.DEFAULT_RULES,
        config.seed)
    # Prompts and reply caps as rollouts make them (no <think>, max_turn_tokens a turn): outside
    # harnesses never send max_tokens, and an untrained policy would otherwise fill the cache.
    server = serve_lib.build(tok, cfg, params, cache_len=config.rollout.cache_len,
                             host=FLAGS.host, port=FLAGS.port, enable_thinking=False,
                             max_tokens=config.rollout.max_turn_tokens)
    print(f"serving {FLAGS.workdir} at {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()


if __name__ == "__main__":
    app.run(main)
