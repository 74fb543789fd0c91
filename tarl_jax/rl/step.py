"""The one pure train step: (state, batch, rng) -> (state, metrics), jitted over a mesh.

state = {"step": int32 scalar, "params": {"policy": decoder params[, "value": critic head]
                                           [, "audio": audio encoder, when it is trained]},
         "opt_state": optax state}
batch = pack.py's arrays [B, T] (tokens, positions, segment_ids, targets, loss_mask,
        advantages, logprobs, ref_logprobs), plus for PPO `token_rewards` and `values` (the
        critic's values at rollout time, from `make_score_fn`).

The critic (PPO) is a linear head on the policy's final hidden states with the trunk's gradient
stopped: it costs one [B, T, D] x [D] product instead of a second model, and it cannot pull the
policy around. Its learning rate is separate (the paper: actor 1e-6, critic 1e-5).

Gradient accumulation scans over `microbatches` equal slices of the batch and averages their
gradients; each slice's loss is normalised within the slice (token_mean etc.), so slices weigh
equally whatever their token counts. Log-probs come from `chunked_logprobs`: [B, T, V] logits
never exist.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tarl_jax import sharding
from tarl_jax.models import audio as audio_lib
from tarl_jax.models import omni, qwen
from tarl_jax.rl import advantages as adv_lib
from tarl_jax.rl import losses

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "advantages",
              "logprobs", "ref_logprobs")
PPO_KEYS = ("token_rewards", "values")
GATHER_KEYS = ("policy_index",)  # score only the loss-mask positions (pack.policy_index)
AUDIO_KEYS = ("audio",)   # speech: [rows, A, D] embeddings of a frozen audio encoder (pack.py)
MEL_KEYS = ("mel", "mel_lens")   # speech, encoder trained: [rows, C, mels, window], [rows, C]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: losses.LossConfig = losses.LossConfig()
    logprob_chunk: int = 4096       # vocabulary chunk of chunked_logprobs
    microbatches: int = 1
    temperature: float = 1.0        # log-probs of softmax(logits / T), as the sampler reports them
    ppo: bool = False               # critic + GAE advantages computed inside the step
    gamma: float = 1.0
    # GAE's lambda for the actor's advantages and for the critic's targets, decoupled as in
    # VC-PPO. Both 1 by default: rewards arrive at a turn's last token and an episode holds
    # hundreds of policy tokens, so any lambda < 1 per token all but erases the outcome before
    # it reaches a turn's first tokens (0.95: 0.006 of it 100 tokens back).
    lam: float = 1.0
    critic_lam: float = 1.0
    value_coef: float = 0.5
    # A batch whose advantages are all 0 (every group tied) has no policy gradient; Adam would
    # still move every parameter on its momentum. Such a step leaves params and optimizer
    # state as they were (metrics["skipped"] = 1). PPO's in-step advantages never tie.
    skip_no_signal: bool = True
    audio_token_id: int = -1        # placeholder whose embedding batch["audio"] replaces
    audio: audio_lib.AudioConfig | None = None   # params["audio"], when the encoder trains (batch["mel"])


def make_optimizer(lr: float, warmup_steps: int = 0, total_steps: int = 1000,
                   schedule: str = "constant", clip_norm: float = 1.0, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, critic_lr: float | None = None):
    def sched(peak):
        if schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 1),
                                                      max(total_steps, warmup_steps + 1))
        if schedule == "constant":
            return optax.join_schedules(
                [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)), optax.constant_schedule(peak)],
                [max(warmup_steps, 1)]) if warmup_steps else optax.constant_schedule(peak)
        raise ValueError(f"schedule={schedule!r} unknown; choose constant | cosine")

    def adam(peak):
        return optax.adamw(sched(peak), b1=b1, b2=b2, weight_decay=weight_decay)

    inner = adam(lr)
    if critic_lr is not None:
        # A trained audio encoder learns with the policy.
        inner = optax.multi_transform({"policy": adam(lr), "value": adam(critic_lr)},
                                      lambda params: {k: "value" if k == "value" else "policy"
                                                      for k in params})
    return optax.chain(optax.clip_by_global_norm(clip_norm), inner)


def value_head_params(model_cfg: qwen.DecoderConfig) -> dict:
    return {"w": jnp.zeros((model_cfg.hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def _value_axes() -> dict:
    return {"w": jax.sharding.PartitionSpec("embed"), "b": jax.sharding.PartitionSpec()}


def state_logical_axes(model_cfg: qwen.DecoderConfig, optimizer, ppo: bool,
                       audio_cfg: audio_lib.AudioConfig | None = None) -> dict:
    """Logical PartitionSpecs of the whole train state (optimizer moments mirror the params)."""
    boxed = {"policy": qwen.boxed_params(model_cfg)}
    if audio_cfg is not None:
        boxed["audio"] = audio_lib.boxed_params(audio_cfg)
    if ppo:
        boxed["value"] = jax.tree.map(
            lambda x, s: nn.LogicallyPartitioned(x, tuple(s)),
            jax.eval_shape(lambda: value_head_params(model_cfg)), _value_axes())
    return {"step": jax.sharding.PartitionSpec(),
            "params": nn.get_partition_spec(boxed),
            "opt_state": nn.get_partition_spec(jax.eval_shape(optimizer.init, boxed))}


def state_shardings(model_cfg, optimizer, ppo, mesh, rules=sharding.DEFAULT_RULES, audio_cfg=None):
    return sharding.logical_sharding(state_logical_axes(model_cfg, optimizer, ppo, audio_cfg),
                                     mesh, rules)


def at_step(state: dict, step: int) -> dict:
    """`state` with its step counter set to `step` (where a resumed run starts), on the
    counter's own sharding: for loop steps that made several updates (the SFT control) or none
    (a tied batch)."""
    return {**state, "step": jax.device_put(np.int32(step), state["step"].sharding)}


def init_state(policy_params, optimizer, model_cfg, ppo: bool, shardings,
               audio_params=None) -> dict:
    """Place the params on their shardings and build the optimiser state there."""
    params = {"policy": policy_params}
    if audio_params is not None:
        params["audio"] = audio_params
    if ppo:
        params["value"] = value_head_params(model_cfg)
    params = sharding.reshard(params, shardings["params"])
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    step = sharding.reshard(jnp.zeros((), jnp.int32), shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}


def forward(model_cfg: qwen.DecoderConfig, params: dict, batch: dict, cfg: StepConfig):
    """(logp, entropy, values|None) of batch["targets"], all [B, T] float32."""
    model = qwen.Decoder(model_cfg)
    embeds, heard = None, batch.get("audio")
    if "mel" in batch:   # the encoder trains: its gradient flows through the merged embeddings
        heard = omni.encode_rows(cfg.audio, params["audio"], batch["mel"], batch["mel_lens"])
    if heard is not None:
        embeds = omni.merge_audio_rows(
            model.apply({"params": params["policy"]}, batch["tokens"], method=qwen.Decoder.embed),
            batch["tokens"], heard, cfg.audio_token_id)
    hidden, _ = model.apply({"params": params["policy"]}, batch["tokens"], batch["positions"],
                            batch["segment_ids"], embeds=embeds)
    w = model.apply({"params": params["policy"]}, method=qwen.Decoder.output_matrix)
    if "policy_index" in batch:
        # Only the positions the loss reads go through the vocabulary projection; the rest of
        # logp / entropy is 0 (off the mask).
        idx = batch["policy_index"]
        b, t = batch["targets"].shape
        safe = jnp.minimum(idx, t - 1)
        logp_m, ent_m = losses.chunked_logprobs(
            jnp.take_along_axis(hidden, safe[..., None], axis=1), w,
            jnp.take_along_axis(batch["targets"], safe, axis=1), cfg.logprob_chunk,
            temperature=cfg.temperature)
        rows = jnp.arange(b)[:, None]
        logp = jnp.zeros((b, t), logp_m.dtype).at[rows, idx].set(logp_m, mode="drop")
        ent = jnp.zeros((b, t), ent_m.dtype).at[rows, idx].set(ent_m, mode="drop")
    else:
        logp, ent = losses.chunked_logprobs(hidden, w, batch["targets"], cfg.logprob_chunk,
                                            temperature=cfg.temperature)
    values = None
    if "value" in params:
        h = jax.lax.stop_gradient(hidden).astype(jnp.float32)
        values = h @ params["value"]["w"] + params["value"]["b"]
    return logp, ent, values


def _loss(params, batch, model_cfg, cfg: StepConfig):
    logp, ent, values = forward(model_cfg, params, batch, cfg)
    if cfg.ppo:
        mask = batch["loss_mask"]
        adv, returns = adv_lib.gae(batch["token_rewards"], batch["values"], mask,
                                   batch["segment_ids"], cfg.gamma, cfg.lam)
        if cfg.critic_lam != cfg.lam:
            _, returns = adv_lib.gae(batch["token_rewards"], batch["values"], mask,
                                     batch["segment_ids"], cfg.gamma, cfg.critic_lam)
        # Whitened over the slice's policy tokens, as PPO implementations do.
        m = mask.astype(jnp.float32)
        n = jnp.maximum(m.sum(), 1.0)
        mean = (adv * m).sum() / n
        std = jnp.sqrt((jnp.square(adv - mean) * m).sum() / n)
        batch = dict(batch, advantages=jnp.where(mask, (adv - mean) / (std + 1e-6), 0.0))
    loss, metrics = losses.policy_loss(logp, batch, cfg.loss, entropy=ent)
    if cfg.ppo:
        vf, vf_metrics = losses.value_loss(values, batch["values"], returns, batch["loss_mask"],
                                           cfg.loss, batch["segment_ids"])
        loss = loss + cfg.value_coef * vf
        metrics.update(vf_metrics, loss=loss)
    return loss, metrics


def train_step(state: dict, batch: dict, rng: jax.Array, *, model_cfg, cfg: StepConfig,
               optimizer, micro_sharding=None) -> tuple[dict, dict]:
    """Pure: the rng is folded with the step for any stochastic term (none by default).
    micro_sharding(ndim): where a microbatch slice's rows go (jit_train_step: over the batch
    axes, as the whole batch's rows are)."""
    del rng  # no dropout in these models; the argument keeps the signature stable.
    m = cfg.microbatches
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    if m == 1:
        (_, metrics), grads = grad_fn(state["params"], batch, model_cfg, cfg)
    else:
        rows = batch["tokens"].shape[0]
        if rows % m:
            raise ValueError(f"batch rows {rows} not divisible by microbatches={m}")
        micro = jax.tree.map(lambda x: x.reshape((m, rows // m) + x.shape[1:]), batch)
        if micro_sharding is not None:
            # The reshape leaves the batch's sharding on the slice axis: each scanned slice would
            # sit whole on a few chips (every chip computing every row of it: activations m x the
            # sharded size). Spread each slice's rows over the batch axes instead.
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x, micro_sharding(x.ndim)), micro)

        def body(acc, mb):
            (_, metr), g = grad_fn(state["params"], mb, model_cfg, cfg)
            return jax.tree.map(jnp.add, acc, (g, metr)), None

        zero_g = jax.tree.map(jnp.zeros_like, state["params"])
        zero_m = jax.eval_shape(lambda: grad_fn(state["params"], jax.tree.map(lambda x: x[0], micro),
                                                model_cfg, cfg)[0][1])
        zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_m)
        (grads, metrics), _ = jax.lax.scan(body, (zero_g, zero_m), micro)
        grads = jax.tree.map(lambda g: g / m, grads)
        metrics = {k: v if k == "tokens" else v / m for k, v in metrics.items()}
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A non-finite loss, gradient or result is never applied: params and optimizer state stay
    # as they were (metrics["nonfinite"] = 1; the trainer stops after rl.max_nonfinite in a row).
    grad_norm = optax.global_norm(grads)
    apply = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
             & jnp.isfinite(optax.global_norm(params)))
    metrics["nonfinite"] = 1.0 - apply.astype(jnp.float32)
    if cfg.skip_no_signal and not cfg.ppo:
        signal = jnp.any((batch["advantages"] != 0) & batch["loss_mask"].astype(bool))
        metrics["skipped"] = 1.0 - signal.astype(jnp.float32)
        apply = apply & signal
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                                     (params, opt_state), (state["params"], state["opt_state"]))
    metrics["grad_norm"] = grad_norm
    if "audio" in grads:
        metrics["grad_norm/audio"] = optax.global_norm(grads["audio"])
    metrics["param_norm"] = optax.global_norm(params)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


_TRAILING = {"audio": (None, None), "mel": (None, None, None), "mel_lens": (None,)}


def batch_shardings(batch_keys, mesh, rules=sharding.DEFAULT_RULES) -> dict:
    return {k: sharding.spec(mesh, "batch", *_TRAILING.get(k, ("length",)), rules=rules)
            for k in batch_keys}


def jit_train_step(model_cfg, cfg: StepConfig, optimizer, mesh, state_sh, batch_keys,
                   rules=sharding.DEFAULT_RULES):
    """The jitted step with explicit in/out shardings; the state is donated."""
    rows_axes = nn.logical_to_mesh_axes(("batch",), list(rules))[0]
    fn = functools.partial(
        train_step, model_cfg=model_cfg, cfg=cfg, optimizer=optimizer,
        micro_sharding=lambda ndim: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, rows_axes, *([None] * (ndim - 2)))))
    b_sh = batch_shardings(batch_keys, mesh, rules)
    return jax.jit(sharding.in_logical_context(fn, mesh, rules),
                   in_shardings=(state_sh, b_sh, sharding.replicated(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def make_score_fn(model_cfg, cfg: StepConfig, mesh, params_sh, batch_keys,
                  rules=sharding.DEFAULT_RULES):
    """jit(params, batch) -> (logp, values|None) without gradients: reference log-probs (with the
    reference params) and rollout-time critic values (PPO)."""
    b_sh = batch_shardings(batch_keys, mesh, rules)
    out = sharding.spec(mesh, "batch", "length", rules=rules)

    def score(params, batch):
        logp, _, values = forward(model_cfg, params, batch, cfg)
        return logp, values

    return jax.jit(sharding.in_logical_context(score, mesh, rules),
                   in_shardings=(params_sh, b_sh), out_shardings=(out, out))


def device_batch(arrays: dict, keys, mesh, rules=sharding.DEFAULT_RULES) -> dict:
    """Host numpy arrays (this host's rows) -> global arrays sharded over the batch axis."""
    return sharding.host_batch_to_global({k: arrays[k] for k in keys}, mesh, rules)



def acting_params(params: dict) -> dict:
    """The params the policy acts with (rollouts; the KL anchor keeps these): all but the critic."""
    return {k: v for k, v in params.items() if k != "value"}
