"""Scored episodes -> one packed batch every host agrees on, and the jitted step that eats it.

    advantages (estimator x credit mode) -> pack (this host's rows, a shape all hosts share)
    -> PPO's per-token rewards -> the step's batch keys

`batch_keys` is the one list of fields a step reads; `build_step` the one jitted-step builder
(warm start and RL both use it).
"""
from __future__ import annotations

import jax
import numpy as np

from tarl_jax import distributed
from tarl_jax.rl import advantages as adv_lib
from tarl_jax.rl import losses
from tarl_jax.rl import pack as pack_lib
from tarl_jax.rl import step as step_lib


def batch_keys(ppo: bool = False, audio: str | None = None) -> tuple[str, ...]:
    """The fields a step reads. audio: None (text), "embeddings" (a frozen encoder's, cached)
    or "mel" (the encoder trains: the step encodes the rows' log-mel)."""
    keys = step_lib.BATCH_KEYS + step_lib.GATHER_KEYS + (step_lib.PPO_KEYS if ppo else ())
    if audio == "mel":
        return keys + step_lib.MEL_KEYS
    return keys + (step_lib.AUDIO_KEYS if audio == "embeddings" else ())


def step_config(config, audio_token_id: int = -1, audio_cfg=None) -> step_lib.StepConfig:
    """The RL step's settings from a run's config.

    - rl.agg "" takes the algorithm's own aggregation: Dr.GRPO's constant normaliser
      (token_sum_norm) for dr_grpo, token_mean otherwise. token_sum_norm's constant is the most
      policy tokens an episode can hold, rollout.max_turn_tokens x world.max_steps.
    - rollout.temperature 0 (greedy rows) scores log-probs at temperature 1, as the sampler
      reports them for greedy rows.
    """
    c = config
    if c.rollout.temperature < 0:
        raise ValueError(f"rollout.temperature={c.rollout.temperature}: must be >= 0 (0: greedy)")
    agg = c.rl.agg or ("token_sum_norm" if c.rl.algo == "dr_grpo" else "token_mean")
    return step_lib.StepConfig(
        loss=losses.LossConfig(policy_loss=c.rl.policy_loss, clip_low=c.rl.clip_low,
                               clip_high=c.rl.clip_high, agg=agg,
                               max_len=c.rollout.max_turn_tokens * c.world.max_steps,
                               kl_coef=c.rl.kl_coef, kl_estimator=c.rl.kl_estimator),
        logprob_chunk=c.rl.logprob_chunk, microbatches=c.rl.microbatches,
        temperature=c.rollout.temperature or 1.0, ppo=c.rl.algo == "ppo", gamma=c.rl.gamma,
        lam=c.rl.lam, critic_lam=c.rl.critic_lam, skip_no_signal=c.rl.skip_no_signal,
        audio_token_id=audio_token_id, audio=audio_cfg)


def build_step(model_cfg, step_cfg, optimizer, mesh, rules, keys, audio_cfg=None):
    """(state shardings, jitted donated train step) for a batch with `keys`."""
    state_sh = step_lib.state_shardings(model_cfg, optimizer, step_cfg.ppo, mesh, rules, audio_cfg)
    return state_sh, step_lib.jit_train_step(model_cfg, step_cfg, optimizer, mesh, state_sh, keys,
                                             rules)


def episode_advantages(config, rewards, turn_rewards, episodes, group_ids):
    """[N] (trajectory credit) or [N, K] (per_turn, trajectory_turn) advantages; None for PPO (the step computes
    its own with GAE)."""
    algo, credit = config.rl.algo, config.rl.credit
    if algo == "ppo":
        return None
    if credit == "trajectory":
        return np.asarray(adv_lib.compute_advantages(algo, rewards, group_ids))
    # Turns padded to a fixed width (the step cap, or the next power of two past it): one
    # compiled returns-to-go scan, not one per longest-episode length.
    n, k = turn_rewards.shape
    width = max(config.world.get("max_steps", 0), 1 << max(k - 1, 0).bit_length())
    padded = np.zeros((n, width), np.float32)
    padded[:, :k] = turn_rewards
    mask = np.zeros((n, width), bool)
    for i, ep in enumerate(episodes):
        mask[i, :max(len(ep.agent_turns), 1)] = True
    return np.asarray(adv_lib.compute_advantages(algo, padded, group_ids,
                                                 credit=credit, turn_mask=mask,
                                                 gamma=config.rl.gamma,
                                                 turn_scale=config.reward.w_neg or 1.0))[:, :k]


def pack_agreed(episodes, advs, seq_lens, rows, overflow, **audio) -> pack_lib.Packed:
    """Pack this host's episodes into a shape every host agrees on: each host's rows are its
    slice of the global batch, so all hosts need the same [rows, T]. `rows` buckets are global;
    a host gets bucket / host count rows."""
    hosts = jax.process_count()
    rows = [r // hosts for r in rows if r % hosts == 0]
    packed = pack_lib.pack(episodes, advs, seq_lens=seq_lens, rows=rows, overflow=overflow,
                           **audio)
    if hosts > 1:
        shapes = distributed.allgather_json([packed.stats["seq_len"], packed.stats["rows"]])
        t_len, n_rows = max(s[0] for s in shapes), max(s[1] for s in shapes)
        if (t_len, n_rows) != (packed.stats["seq_len"], packed.stats["rows"]):
            packed = pack_lib.pack(episodes, advs, seq_lens=(t_len,), rows=(n_rows,),
                                   overflow=overflow, **audio)
    agree_widths(packed.arrays)
    return packed


def rl_batch(config, episodes, rewards, turn_rewards, group_ids, *, speech=None,
             audio_token_id: int = -1, train_audio: bool = False) -> pack_lib.Packed:
    """Advantages -> one host-agreed packed batch with every field the RL step reads (PPO's
    `token_rewards` and placeholder `values`, filled by the critic before the update).

    Args:
      config: the run's config (rl.*, pack.*).
      episodes: this host's episodes, G per task, tasks in order; rewards [N], turn_rewards
        [N, K] and group_ids [N] from judge/score.py and the rollout.
      speech, audio_token_id, train_audio: the speech view and how the step hears (pack.py).
    Returns:
      pack.Packed; episodes without an agent turn are left out (nothing to train on).
    """
    advs = episode_advantages(config, rewards, turn_rewards, episodes, group_ids)
    keep = [i for i, ep in enumerate(episodes) if ep.agent_turns]
    p = config.pack
    packed = pack_agreed([episodes[i] for i in keep], None if advs is None else advs[keep],
                         p.seq_lens, p.rows, p.overflow, audio=speech,
                         audio_token_id=audio_token_id,
                         audio_as="mel" if train_audio else "embeddings")
    if config.rl.algo == "ppo":
        arrays = packed.arrays
        values = rewards[keep] if config.rl.credit == "trajectory" else turn_rewards[keep]
        arrays["token_rewards"] = pack_lib.scatter_turn_values(arrays, values, at="last")
        arrays["values"] = np.zeros_like(arrays["advantages"])
    return packed


def agree_widths(arrays: dict) -> None:
    """Hosts' bucketed second dims (policy_index [rows, M], audio [rows, A, D], mel [rows, C,
    ...]) must agree: pad each to the largest (positions with T, embeddings and chunks with
    zeros: a chunk of 0 frames is padding)."""
    if jax.process_count() == 1:
        return
    t = arrays["tokens"].shape[1]
    for key, fill in (("policy_index", t), ("audio", 0), ("mel", 0), ("mel_lens", 0)):
        if key in arrays:
            x = arrays[key]
            size = max(distributed.allgather_json(x.shape[1]))
            pad = [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
            arrays[key] = np.pad(x, pad, constant_values=fill)
