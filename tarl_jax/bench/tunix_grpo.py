"""google-tunix's GRPO update on a batch written by `bench.train_step`, which runs this file with
the tunix venv's python (tunix stays out of the project venv and its pins):

    .venv-tunix/bin/python tarl_jax/bench/tunix_grpo.py DIR

DIR holds config.json, params.npz (our parameter names, '/'-joined) and batch.npz. Prints one
JSON line after the first (compiling) step: its seconds, loss and gradient norm; then runs one
more step per line read from stdin and prints its wall and CPU seconds as one JSON line.

What is timed is tunix's own jitted actor update, wired as `GRPOLearner.__init__` wires it: the
`tunix.rl.trainer.Trainer` that GRPOLearner drives, with `grpo_loss_fn` as its loss and
`jit_train_and_eval_step()`'s train step (one `nnx.jit`, optimizer donated) called on a
`TrainExample`: forward over prompt + completion, clipped GRPO loss + KL to the reference +
entropy, gradients, gradient norm, optax update. Sampling, rewards and advantages are not timed.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.qwen3 import model as qwen3
from tunix.rl import algo_core
from tunix.rl import trainer as rl_trainer
from tunix.rl.grpo import grpo_learner
from tunix.sft import peft_trainer

# Our name -> tunix's, per layer and global; every array of both trees must be matched.
LAYER_NAMES = {
    "attn/q": "attn/q_proj/w", "attn/k": "attn/k_proj/w", "attn/v": "attn/v_proj/w",
    "attn/o": "attn/o_proj/w", "attn/q_norm/scale": "attn/q_norm/w",
    "attn/k_norm/scale": "attn/k_norm/w", "input_norm/scale": "input_layernorm/w",
    "post_norm/scale": "post_attention_layernorm/w", "mlp/gate": "mlp/gate_proj/kernel",
    "mlp/up": "mlp/up_proj/kernel", "mlp/down": "mlp/down_proj/kernel",
}
GLOBAL_NAMES = {"embedding": "embedder/input_embedding", "final_norm/scale": "final_norm/w"}


def tunix_name(ours: str) -> str:
    if ours in GLOBAL_NAMES:
        return GLOBAL_NAMES[ours]
    head, _, rest = ours.partition("/")
    if head.startswith("layers_") and rest in LAYER_NAMES:
        return f"layers/{head[len('layers_'):]}/{LAYER_NAMES[rest]}"
    raise KeyError(f"no tunix Qwen3 parameter for ours {ours!r}")


def load_params(model, flat: dict):
    state = nnx.state(model, nnx.Param)
    pure = state.to_pure_dict()
    placed = set()
    for ours, value in flat.items():
        *parents, leaf = tunix_name(ours).split("/")
        node = pure
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if node[leaf].shape != value.shape:
            raise ValueError(f"{ours}: ours {value.shape} vs tunix {node[leaf].shape}")
        node[leaf] = jnp.asarray(value)
        placed.add(tunix_name(ours))
    missing = {"/".join(map(str, k)) for k in nnx.traversals.flatten_mapping(pure)} - placed
    if missing:
        raise ValueError(f"tunix parameters not given: {sorted(missing)}")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def main(workdir: str):
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = json.load(f)
    m = cfg["model"]
    # tunix's apply_rope ignores ModelConfig.rope_theta (always 1e6); the bench uses 1e6 too.
    model = qwen3.Qwen3(qwen3.ModelConfig(
        num_layers=m["num_layers"], vocab_size=m["vocab_size"], embed_dim=m["hidden_size"],
        hidden_dim=m["intermediate_size"], num_heads=m["num_heads"], head_dim=m["head_dim"],
        num_kv_heads=m["num_kv_heads"], rope_theta=int(m["rope_theta"]), norm_eps=m["rms_eps"],
        use_tied_embedding=m["tie_embeddings"]), rngs=nnx.Rngs(0))
    load_params(model, dict(np.load(os.path.join(workdir, "params.npz"))))

    opt = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]),
                      optax.adamw(cfg["lr"], b1=0.9, b2=0.999, weight_decay=0.0))
    trainer = rl_trainer.Trainer(model, opt, peft_trainer.TrainingConfig(eval_every_n_steps=10**9),
                                 custom_checkpoint_metadata_fn=dict)
    algo = grpo_learner.GRPOConfig(num_generations=cfg["group"], beta=cfg["kl_coef"],
                                   epsilon=cfg["epsilon"], kl_loss_mode="low_var_kl",
                                   loss_agg_mode="sequence-mean-token-mean")
    algo.temperature = 1.0  # GRPOLearner copies the rollout temperature here
    trainer.with_loss_fn(lambda model, train_example, algo_config: algo_core.grpo_loss_fn(
        model, train_example, algo_config=algo_config, pad_id=cfg["pad_id"], eos_id=cfg["eos_id"]),
        has_aux=True)
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
    train_step, _ = trainer.jit_train_and_eval_step()

    b = {k: jnp.asarray(v) for k, v in np.load(os.path.join(workdir, "batch.npz")).items()}
    example = grpo_learner.TrainExample(
        prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_ids"] != cfg["pad_id"],
        completion_ids=b["completion_ids"], completion_mask=b["completion_mask"],
        advantages=b["advantages"], ref_per_token_logps=b["ref_logps"],
        old_per_token_logps=b["old_logps"])

    first = [None]

    def step():
        loss, _, grad_norm = train_step(example)
        jax.block_until_ready((loss, nnx.state(model, nnx.Param)))
        if first[0] is None:
            first[0] = {"loss": float(loss), "grad_norm": float(grad_norm)}

    start = time.perf_counter()
    step()
    print(json.dumps({"first_s": time.perf_counter() - start, **first[0], "jax": jax.__version__}),
          flush=True)
    # The parent alternates its steps with ours, one stdin line per timed step, so both see the
    # same load on a shared machine.
    for _ in sys.stdin:
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}),
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR (written by python -m tarl_jax.bench.train_step)")
    main(sys.argv[1])
