"""Advantage estimators: pure, fixed-shape jnp functions chosen by name from config.

Group estimators (GRPO, RLOO, Dr.GRPO) compare the G samples of one task. `group_ids` [N]
(ints in [0, N)) says which task each episode belongs to, so groups may be ragged (an episode
that failed to run simply leaves its group smaller); a group of one gets advantage 0.

    REGISTRY[name](returns, episode_returns, group_ids, eps) -> advantages (shape of returns)

`compute_advantages` wraps them with a credit mode:
  "trajectory": one scalar per episode (the paper's stable choice); pack.py spreads it onto every
      policy token of the episode.
  "per_turn": each agent turn k gets its own advantage, from its return-to-go
      G[i, k] = sum_{j >= k} gamma^(j-k) r[i, j], i.e. that turn's reward and all later ones.

Per-turn baseline (why this scheme): the baseline of every turn of episode i is the group
statistic of the *episode-level* return G[i, 0], the same number trajectory credit uses:
    GRPO     A[i, k] = (G[i, k] - mean_g G[., 0]) / (s + eps)
             s: ONE scale for the whole batch, the pooled within-group std of G[., 0]
             (sqrt(sum of squared deviations from the group means / sum of (n_g - 1))).
             Per-group stds do not work per turn: a group whose episodes tie (std 0) still has
             per-turn returns-to-go that differ from its mean, and left unscaled beside groups
             divided by their std it would dominate the batch.
    Dr.GRPO  A[i, k] =  G[i, k] - mean_g G[., 0]
    RLOO     A[i, k] =  G[i, k] - mean_{j in g, j != i} G[j, 0]
  - Unbiased with ragged turn counts: a baseline may depend on anything but episode i's action
    at turn k. RLOO's baseline uses only the other episodes, so it is exactly unbiased. GRPO and
    Dr.GRPO include episode i's own return with weight 1/n; its rewards at or after turn k thus
    shrink every turn's gradient by the same factor (n-1)/n (the uniform scale trajectory GRPO
    already has, which biases no turn against another); its rewards before turn k are history,
    which a baseline may use. (GRPO's std also includes episode i: the usual GRPO bias that
    Dr.GRPO removes.)
  - Always defined: every group of two or more has episode-level statistics, whereas a
    turn-index-aligned baseline ("mean of G[j, k] over peers that reached turn k") has few or
    no peers exactly at the late turns of long episodes, and a turn index does not mean the
    same state across episodes anyway.
  - Consistent with trajectory credit: when all reward arrives at the last turn (outcome only),
    G[i, k] = G[i, 0] for every k and per-turn advantages equal the trajectory ones (GRPO:
    up to the scale, pooled over the batch instead of per group).

  - Unstable where a mistake comes early (measured at level 1 of the synthetic world, README):
    every turn after an episode's -1 has a return-to-go near 0 against a baseline that holds
    the -5, and when a batch's episodes all fail their returns differ only by the +5/T bits, so
    the pooled std is ~0.1: the turns after a mistake got advantages up to +64 (gradient norm
    17 where unit advantages give 0.75), pushing up whatever the agent did after it.
  "trajectory_turn": the trajectory advantage of the episode on every turn, plus the turn's own
    reward's deviation from its episode's mean turn reward, in units of `turn_scale` (the
    judge's -1 penalty w_neg, so a -1 turn's part is about -1, a trajectory advantage's size):
        A[i, k] = A_traj[i] + (r[i, k] - mean_j r[i, j]) / turn_scale
    The outcome share w_out * outcome / T is the same on every turn of an episode, so the
    deviation is the judge's alone: the -1 turn is pushed down, +1 turns up, the rest by
    little, keeping the reward's own weights (5 against 5/T). A fixed unit, not a batch
    statistic: standardising by the batch's spread would blow a rare -1 up again (one in 960
    turns: -31). The turn part sums to 0 over an episode (it moves credit between turns, never
    between episodes), as in MT-GRPO's turn-level advantage added to the outcome's (Zeng et al.,
    2025, there normalised over the group's turns); like it, a shaping of credit, not an
    unbiased per-turn estimator (a turn's deviation reads its episode's later turns).
PPO uses `gae` instead: token-level rewards and critic values over the packed rows.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def group_stats(x: jax.Array, group_ids: jax.Array):
    """Per-episode (sum, count, unbiased std) of x over the episode's group; x, group_ids: [N]."""
    n = x.shape[0]
    total = jax.ops.segment_sum(x, group_ids, num_segments=n)[group_ids]
    count = jax.ops.segment_sum(jnp.ones_like(x), group_ids, num_segments=n)[group_ids]
    sq = jax.ops.segment_sum(jnp.square(x - total / count), group_ids, num_segments=n)[group_ids]
    # ddof=1 as in TRL and Tunix.
    std = jnp.sqrt(sq / jnp.maximum(count - 1, 1))
    return total, count, std


STD_FLOOR = 1e-4


def _per_episode(stat: jax.Array, returns: jax.Array) -> jax.Array:
    return stat.reshape(stat.shape + (1,) * (returns.ndim - 1))


def _no_peers_zero(adv, count, returns):
    """A group of one has no baseline: its advantage is 0 rather than its raw return."""
    return jnp.where(_per_episode(count, returns) > 1, adv, 0.0)


def grpo(returns, episode_returns, group_ids, eps=1e-6):
    total, count, std = group_stats(episode_returns, group_ids)
    # A group whose episodes all scored the same has std 0: trajectory advantages are then 0
    # anyway, but per-turn returns-to-go still differ from the mean, and dividing by eps would
    # blow them up by 1e6. Such a group is left unscaled (Dr.GRPO's choice).
    scale = jnp.where(std > STD_FLOOR, std + eps, 1.0)
    adv = (returns - _per_episode(total / count, returns)) / _per_episode(scale, returns)
    return _no_peers_zero(adv, count, returns)


def dr_grpo(returns, episode_returns, group_ids, eps=1e-6):
    del eps  # Dr.GRPO's point is dropping the std division.
    total, count, _ = group_stats(episode_returns, group_ids)
    return _no_peers_zero(returns - _per_episode(total / count, returns), count, returns)


def rloo(returns, episode_returns, group_ids, eps=1e-6):
    del eps  # no division by group statistics
    total, count, _ = group_stats(episode_returns, group_ids)
    baseline = (total - episode_returns) / jnp.maximum(count - 1, 1)
    return _no_peers_zero(returns - _per_episode(baseline, returns), count, returns)


def pooled_scale(episode_returns, group_ids, eps=1e-6):
    """The pooled within-group std of episode returns over all groups of two or more (+ eps),
    or 1 when every such group ties: one scale for every group of a batch."""
    total, count, _ = group_stats(episode_returns, group_ids)
    peers = count > 1
    sq = jnp.where(peers, jnp.square(episode_returns - total / count), 0.0)
    dof = jnp.sum(jnp.where(peers, (count - 1) / count, 0.0))   # sum over groups of n_g - 1
    std = jnp.sqrt(jnp.sum(sq) / jnp.maximum(dof, 1.0))
    return jnp.where(std > STD_FLOOR, std + eps, 1.0)


REGISTRY: dict[str, Callable] = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}
CREDIT_MODES = ("trajectory", "per_turn", "trajectory_turn")


def get(name: str) -> Callable:
    if name not in REGISTRY:
        raise KeyError(f"advantage estimator {name!r} unknown; choose from {sorted(REGISTRY)}")
    return REGISTRY[name]


# Jitted (gamma static): eagerly, the scan of a fresh closure compiled again on every call.
@functools.partial(jax.jit, static_argnames="gamma")
def returns_to_go(turn_rewards: jax.Array, turn_mask: jax.Array, gamma: float = 1.0) -> jax.Array:
    """G[i, k] = sum_{j >= k} gamma^(j-k) r[i, j] over valid turns; 0 on invalid turns. [N, K]."""
    r = jnp.where(turn_mask, turn_rewards, 0.0)

    def step(carry, rk):
        g = rk + gamma * carry
        return g, g

    _, g = jax.lax.scan(step, jnp.zeros(r.shape[0], r.dtype), r.T, reverse=True)
    return jnp.where(turn_mask, g.T, 0.0)


def turn_deviations(turn_rewards, turn_mask):
    """Each valid turn's reward minus its episode's mean turn reward (0 on invalid turns)."""
    m = turn_mask.astype(jnp.float32)
    mean = (turn_rewards * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return (turn_rewards - mean[:, None]) * m


def compute_advantages(name: str, rewards: jax.Array, group_ids: jax.Array, *,
                       credit: str = "trajectory", turn_mask: jax.Array | None = None,
                       gamma: float = 1.0, eps: float = 1e-6, turn_scale: float = 1.0) -> jax.Array:
    """rewards: [N] episode rewards, or [N, K] per-turn rewards with turn_mask [N, K].
    turn_scale: the unit of trajectory_turn's turn part (the batch code passes reward.w_neg).

    Returns [N] for credit="trajectory" (per-turn rewards summed, discounted by gamma, into the
    episode return),
    [N, K] for credit="per_turn" and "trajectory_turn" (0 on invalid turns).
    """
    fn = get(name)
    rewards = jnp.asarray(rewards, jnp.float32)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    if credit not in CREDIT_MODES:
        raise ValueError(f"credit={credit!r} unknown; choose from {CREDIT_MODES}")
    if rewards.ndim == 1:
        if credit != "trajectory":
            raise ValueError(f"credit={credit!r} needs per-turn rewards [N, K] and turn_mask")
        return fn(rewards, rewards, group_ids, eps)
    if turn_mask is None:
        raise ValueError(f"per-turn rewards {rewards.shape} need turn_mask [N, K]")
    g = returns_to_go(rewards, turn_mask, gamma)
    if credit in ("trajectory", "trajectory_turn"):
        traj = fn(g[:, 0], g[:, 0], group_ids, eps)
        if credit == "trajectory":
            return traj
        turn = turn_deviations(rewards, jnp.asarray(turn_mask)) / turn_scale
        return jnp.where(turn_mask, traj[:, None] + turn, 0.0)
    if name == "grpo":   # one scale for the batch (see the module docstring)
        adv = dr_grpo(g, g[:, 0], group_ids) / pooled_scale(g[:, 0], group_ids, eps)
        return jnp.where(turn_mask, adv, 0.0)
    return jnp.where(turn_mask, fn(g, g[:, 0], group_ids, eps), 0.0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array,
        segment_ids: jax.Array | None = None, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the policy tokens of each sequence. All [B, T].

    Only masked tokens are steps: a non-policy token (prompt, tool output) between two policy
    tokens is skipped, so the "next value" of a turn's last token is the value at the first token
    of the next agent turn. A sequence ends at its last policy token (next value 0) or, in packed
    rows, where segment_ids changes. Returns (advantages, value targets = advantages + values),
    0 off the mask.
    """
    mask = mask.astype(bool)
    if segment_ids is None:
        segment_ids = jnp.ones(mask.shape, jnp.int32)
    b = rewards.shape[0]

    def step(carry, x):
        v_next, a_next, seg_next = carry
        r, v, m, seg = x
        same = seg == seg_next
        v_next = jnp.where(same, v_next, 0.0)
        a_next = jnp.where(same, a_next, 0.0)
        a = r + gamma * v_next - v + gamma * lam * a_next
        carry = (jnp.where(m, v, v_next), jnp.where(m, a, a_next), jnp.where(m, seg, seg_next))
        return carry, jnp.where(m, a, 0.0)

    init = (jnp.zeros(b, jnp.float32), jnp.zeros(b, jnp.float32), jnp.full(b, -1, jnp.int32))
    xs = (rewards.astype(jnp.float32).T, values.astype(jnp.float32).T, mask.T,
          segment_ids.astype(jnp.int32).T)
    _, adv = jax.lax.scan(step, init, xs, reverse=True)
    adv = adv.T
    return adv, jnp.where(mask, adv + values, 0.0)
