"""Supervised fine-tuning on the scripted expert's dialogues, tokenised exactly as a rollout
would feed them: the warm start before RL, and bench.table's control (`rl.algo=sft`), which
spends an RL step's wall time on SFT instead.

The loss is the RL step's own with advantage 1 on every expert token and no clipping (the
`pg` policy loss, token mean): the mean NLL of the expert's replies.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from tarl_jax import distributed, limits as limits_lib, metrics as metrics_lib
from tarl_jax.rl import batch as batch_lib
from tarl_jax.rl import losses
from tarl_jax.rl import step as step_lib

log = logging.getLogger("tarl_jax")


def step_config(rl_step_cfg: step_lib.StepConfig) -> step_lib.StepConfig:
    """The RL step's settings turned into SFT's (no critic, temperature 1, mean NLL)."""
    return dataclasses.replace(rl_step_cfg, ppo=False, temperature=1.0,
                               loss=losses.LossConfig(policy_loss="pg", agg="token_mean"))


class Demonstrations:
    """The expert's solved episodes on this host's share of the training tasks, and SFT batches
    of them. In speech mode every other demonstration is heard: SFT covers both modalities. The
    expert gets tau-bench's 30-step cap even where rollouts are cut shorter.

    Args:
      config: the run's config (warmstart.episodes / dialogues / batch_rows / seq_len).
      world, tok, tool_view, speech, audio_id: what a rollout is built from (components.py).
      mesh, rules: where batches go.
    """

    def __init__(self, config, world, tok, tool_view, speech, audio_id, mesh, rules):
        self.c, self.speech, self.audio_id, self.mesh, self.rules = (
            config.warmstart, speech, audio_id, mesh, rules)
        tasks, _ = distributed.host_share(world.train[:self.c.episodes or None], even=False)
        episodes = limits_lib.expert_episodes(world, tok, tool_view, tasks, speech, max_steps=30)
        self.solved = [ep for ep in episodes if ep.reward >= 1]
        self.total = len(episodes)
        self.keys = batch_lib.batch_keys(audio="embeddings" if speech else None)
        log.info("expert: %d/%d episodes solved; SFT trains on them", len(self.solved), self.total)

    def batch(self, rng: np.random.Generator, i: int) -> dict:
        """Update i's device batch: warmstart.dialogues (0: batch_rows) solved episodes drawn
        without replacement, packed whole into batch_rows x seq_len rows, split over hosts."""
        c = self.c
        per_step = (c.get("dialogues", 0) or c.batch_rows) // jax.process_count()
        pick = rng.choice(len(self.solved), size=min(per_step, len(self.solved)), replace=False)
        # batch_rows rows as a rule; a draw of long dialogues that needs more gets one row each
        # (a second compiled shape, used only then: level 1's 8 dialogues of up to 3.4k tokens
        # in 4 x 4096 rows).
        rows = (c.batch_rows, max(c.batch_rows, c.get("dialogues", 0)))
        batch = batch_lib.pack_agreed([self.solved[j] for j in pick],
                                      np.ones(len(pick), np.float32), (c.seq_len,),
                                      rows, "truncate", audio=self.speech,
                                      audio_token_id=self.audio_id or -1)
        if not batch.stats["policy_tokens"]:
            log.warning("SFT update %d: no assistant token within warmstart.seq_len=%d (the "
                        "prompts are longer); raise it", i, c.seq_len)
        return step_lib.device_batch(batch.arrays, self.keys, self.mesh, self.rules)


def warm_start(params, demos: Demonstrations, model_cfg, rl_step_cfg, config, mesh, rules,
               on_step=None, start: int = 0):
    """warmstart.steps SFT updates from `params` at warmstart.lr (its own optimizer).

    Args:
      on_step(step, params, sft): called after each update with the returned dict so far
        (e.g. to save intermediate policies).
      start: the SFT steps `params` already had (a continued warm start): steps are numbered
        after them and the batches drawn from a stream of their own.
    Returns:
      (the policy's params after SFT, {"nll_first", "nll_last", "expert_solved",
      "expert_episodes"}).
    """
    c = config.warmstart
    optimizer = step_lib.make_optimizer(c.lr, c.warmup_steps, c.steps, c.schedule, 1.0)
    sh, fn = batch_lib.build_step(model_cfg, step_config(rl_step_cfg), optimizer, mesh, rules,
                                  demos.keys)
    state = step_lib.init_state(params, optimizer, model_cfg, False, sh)
    rng = np.random.default_rng([config.seed, jax.process_index()] + ([start] if start else []))
    nll = []
    for i in metrics_lib.progress(range(start, start + c.steps), "warm start"):
        state, m = fn(state, demos.batch(rng, i), jax.random.key(i))
        nll.append(float(m["loss"]))
        sft = {"nll_first": nll[0], "nll_last": nll[-1], "expert_solved": len(demos.solved),
               "expert_episodes": demos.total}
        if on_step is not None:
            on_step(i + 1, state["params"]["policy"], sft)
    log.info("warm start: NLL %.3f -> %.3f over %d steps", nll[0], nll[-1], c.steps)
    return state["params"]["policy"], sft


def control_step(state, train_step, demos: Demonstrations, key, seed: int, step: int,
                 budget: float):
    """One step of the control: SFT updates (the run's own jitted `train_step`, built with
    `step_config`) for `budget` seconds of wall time, at least one; budget 0: one update.
    bench.table sets rl.sft_seconds to the RL arms' mean seconds per step, so the control gets
    the same wall time. A time budget makes the update count (logged: sft/updates) depend on
    the machine, so a resumed control is not bit-identical to an unbroken one, as RL runs are.

    Returns:
      (new state, its step counter = step + 1; metrics of the last update, sft/updates, sft/nll).
    """
    if budget and jax.process_count() > 1:
        raise ValueError("rl.sft_seconds: hosts would disagree on the update count; "
                         "use rl.sft_seconds=0 (one update per step) on several hosts")
    rng = np.random.default_rng([seed, jax.process_index(), step])
    t0, n, nll = time.perf_counter(), 0, []
    while n == 0 or time.perf_counter() - t0 < budget:
        state, m = train_step(state, demos.batch(rng, n), jax.random.fold_in(key, n))
        nll.append(float(m["loss"]))   # waits for the update: the clock sees its cost
        n += 1
    state = step_lib.at_step(state, step + 1)   # the loop's step counts steps, not updates
    metrics = {k: float(v) for k, v in jax.device_get(m).items()}
    metrics.update({"sft/updates": n, "sft/nll": float(np.mean(nll)), "math_batch": 0.0,
                    "time/step_s": time.perf_counter() - t0})
    return state, metrics
