"""The TARL training loop, top to bottom.

    warm start   SFT on the scripted expert's dialogues (optional)
    every step   tasks from the curriculum (rl/curriculum.py) -> G rollouts each (rollout.py:
                 the jitted KV-cache sampler <-> sandbox episodes) -> judge every agent turn and
                 reward (judge/score.py) -> advantages and one host-agreed packed batch
                 (rl/batch.py) -> one jitted, sharded update (rl/step.py)
    periodically pass^k on held-out tasks, an orbax checkpoint (rl/checkpoint.py), metrics
                 (metrics.py: JSONL + TensorBoard, the plot)

What a run is built from (model, tokenizer, task world, users, speech view) is components.py.

Exact resume: everything random is a pure function of (seed, step) — the sampler's key, the
update's rng — and the checkpoint holds the train state and the curriculum's position (its JSON
metadata), so a run killed at any point and restarted continues with the same numbers it would
have produced.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np

from tarl_jax import components, distributed, limits as limits_lib, metrics as metrics_lib
from tarl_jax import rollout, sft, sharding
from tarl_jax.judge import score
from tarl_jax.rl import batch as batch_lib
from tarl_jax.rl import checkpoint as ckpt_lib
from tarl_jax.rl import curriculum as curriculum_lib
from tarl_jax.rl import step as step_lib
from tarl_jax.sampler import Sampler
from tarl_jax.sandbox import domains

log = logging.getLogger("tarl_jax")


class Trainer:
    """One RL run: `run()` trains from the workdir's latest checkpoint (or from scratch, after
    the warm start) to `config.total_steps`.

    Args:
      config: an ml_collections config (configs/tiny.py documents every section).
      workdir: checkpoints/, reference/ (the KL anchor), metrics.jsonl, tb/, episodes/,
        summary.json and reward.png go here.
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            # The run's config beside its checkpoints: `serve --orbax WORKDIR` reads the model,
            # tokenizer and rollout limits from it, and a person what produced the run.
            (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
        c = config
        self.rules = sharding.rules_from_config(c.rules)
        self.mesh = sharding.make_mesh(dict(c.mesh))
        self.tok, self.model_cfg, params, thinker = components.load_model(
            c.model, self.mesh, self.rules, c.seed, with_audio=True)
        self.speech = components.make_speech_view(c, thinker)   # None: text only
        self.audio_id = self.tok.audio_id if self.speech else None
        # model.train_audio: RL updates the audio encoder too (params["audio"]); the step encodes
        # the batch's log-mel itself and rollouts re-encode with each new version.
        self.train_audio = bool(c.model.get("train_audio", False))
        if self.train_audio and self.speech is None:
            raise ValueError("model.train_audio=True needs a model that hears: set model.audio")
        audio_cfg = thinker[0].audio if self.train_audio else None
        self._initial_audio = thinker[1] if self.train_audio else None
        self.world = components.build_world(c)
        self.tool_view = components.tool_view(c)
        # Before anything expensive: how many tasks the rollout limits rule out.
        self.limits = limits_lib.check_run(c, self.world, self.tok, self.tool_view)
        self.curriculum = curriculum_lib.Curriculum.from_config(
            c, c.curriculum.data_dir or self.workdir / "data")
        self.ppo = c.rl.algo == "ppo"
        self.step_cfg = batch_lib.step_config(c, self.audio_id or -1, audio_cfg)
        self.optimizer = step_lib.make_optimizer(
            c.optim.lr, c.optim.warmup_steps, c.total_steps, c.optim.schedule, c.optim.clip_norm,
            c.optim.weight_decay, critic_lr=c.optim.critic_lr if self.ppo else None)
        self.keys = batch_lib.batch_keys(
            self.ppo, None if self.speech is None else "mel" if self.train_audio else "embeddings")
        # rl.algo=sft: the control of bench.table, SFT on the expert's dialogues in place of RL
        # (same loop, evaluations and checkpoints; rl.sft_seconds of updates per step).
        self.sft_control = c.rl.algo == "sft"
        if self.sft_control:
            if self.train_audio:
                raise ValueError("rl.algo=sft trains the decoder only: set model.train_audio=False")
            self.step_cfg = sft.step_config(self.step_cfg)
            self.keys = batch_lib.batch_keys(audio="embeddings" if self.speech else None)
        self._demos = None
        self.state_sh, self.train_step = batch_lib.build_step(
            self.model_cfg, self.step_cfg, self.optimizer, self.mesh, self.rules, self.keys,
            audio_cfg)
        self.score = step_lib.make_score_fn(self.model_cfg, self.step_cfg, self.mesh,
                                            self.state_sh["params"], self.keys, self.rules)
        self.ckpt = ckpt_lib.Checkpointer.for_workdir(self.workdir, save_every=c.checkpoint_every)
        self._stepped = False   # an RL step ran in this process (later ones should not compile)
        self.rng = jax.random.key(c.seed)
        self.sampler = Sampler(self.model_cfg, params, cache_len=c.rollout.cache_len,
                               decode_chunk=c.rollout.get("decode_chunk", 0),
                               audio_token_id=self.audio_id, rules=self.rules,
                               mesh=sharding.local_tensor_mesh(c.rollout.get("tensor", 1)))
        self._initial_params = params

    # -- state ---------------------------------------------------------------------------
    def init_or_restore(self, resume_curriculum: bool = True) -> tuple[dict, dict]:
        """The latest checkpoint's state (and curriculum position, unless only evaluating a
        policy, possibly on other tasks than it was trained on), or a fresh start: warm start,
        the KL anchor, the step-0 evaluation and checkpoint 0.

        Returns:
          (train state, meta: {"history", "evals", "curriculum"[, "warmstart"]}).
        """
        reference = ckpt_lib.reference_dir(self.workdir)
        latest = self.ckpt.latest_step()
        if latest is not None:
            abstract = jax.eval_shape(
                lambda: step_lib.init_state(self._initial_params, self.optimizer, self.model_cfg,
                                            self.ppo, self.state_sh, self._initial_audio))
            abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    abstract, self.state_sh)
            state, meta = self.ckpt.restore(abstract)
            if resume_curriculum:
                if "curriculum" not in meta:
                    raise ValueError(f"the checkpoint in {self.ckpt.directory} has no curriculum "
                                     "state (it predates it): use a new workdir")
                self.curriculum.set_state(meta["curriculum"])
            if self.config.rl.kl_coef:
                self.ref_params = ckpt_lib.restore_params(
                    reference, step_lib.acting_params(abstract["params"]))
            log.info("resumed from step %d in %s", latest, self.ckpt.directory)
            return state, meta
        params = self._initial_params
        meta = {"history": [], "evals": []}
        if self.config.warmstart.get("init"):
            params, meta["warmstart"] = ckpt_lib.load_warm_start(self.config, params)
        elif self.config.warmstart.steps:
            params, meta["warmstart"] = self.warm_start(params)
        state = step_lib.init_state(params, self.optimizer, self.model_cfg, self.ppo, self.state_sh,
                                    self._initial_audio)
        if self.config.rl.kl_coef:
            # The KL anchor is the policy RL starts from (after the warm start), kept on disk so
            # a resumed run anchors to the same weights.
            # A copy: the train step donates (reuses) the state's buffers.
            self.ref_params = jax.tree.map(lambda x: x.copy(),
                                           step_lib.acting_params(state["params"]))
            ckpt_lib.save_params(reference, self.ref_params)
        # A 0-step run (bench.table's shared start) takes the final evaluation here.
        meta["evals"].append({"step": 0, **self.evaluate(state, final=not self.config.total_steps)})
        meta["curriculum"] = self.curriculum.get_state()
        self.ckpt.save(0, state, meta, force=True)
        return state, meta

    # -- warm start ------------------------------------------------------------------------
    def demonstrations(self) -> sft.Demonstrations:
        """The expert's dialogues on the training tasks (made once, on first use)."""
        if self._demos is None:
            self._demos = sft.Demonstrations(self.config, self.world, self.tok, self.tool_view,
                                             self.speech, self.audio_id, self.mesh, self.rules)
        return self._demos

    def warm_start(self, params, on_step=None, start: int = 0) -> tuple[Any, dict]:
        """SFT on the expert's dialogues (sft.warm_start: its Args and Returns)."""
        return sft.warm_start(params, self.demonstrations(), self.model_cfg, self.step_cfg,
                              self.config, self.mesh, self.rules, on_step, start)

    def save_warm_start(self, path) -> dict:
        """Run the warm start on the training split and write its policy to `path` (the file
        `warmstart.init` names), with its provenance and cost. With warmstart.init set, SFT
        continues from that file for warmstart.steps more (a fresh optimizer; steps and
        seconds count on from the file's). With warmstart.climb the file may come from another
        level of the world (the ladder's curriculum): steps count from 0 on this one, seconds
        on from the file's, and the file's world and steps are recorded."""
        t0, c = time.perf_counter(), self.config
        params, start, spent, before = self._initial_params, 0, 0.0, {}
        if c.warmstart.get("init"):
            climb = c.warmstart.get("climb", False)
            params, loaded = ckpt_lib.load_warm_start(c, params, any_world=climb)
            start, spent = (0 if climb else loaded["steps"]), loaded["seconds"]
            before = {"continued_from": loaded["init"]}
            if climb:
                before["climbed_from"] = {"world": loaded["world"], "steps": loaded["steps"]}

        def meta_at(steps, figures):
            return {**ckpt_lib.warm_start_provenance(c), "sft": figures, "steps": steps,
                    "seconds": spent + time.perf_counter() - t0,
                    "warmstart": dict(c.warmstart), "seed": c.seed,
                    "train_tasks": len(self.world.train), **before}

        def on_step(step, params, figures):
            # warmstart.save_every: the policy at every k-th step too (`<out>-<step>.safetensors`),
            # so one run yields the candidates a warm-start length is chosen from (on validation).
            every = c.warmstart.get("save_every", 0)
            if every and step % every == 0 and step < start + c.warmstart.steps:
                p = pathlib.Path(path)
                ckpt_lib.save_flat(p.with_name(f"{p.stem}-{step}{p.suffix}"), params,
                                   meta_at(step, dict(figures)))

        params, figures = self.warm_start(params, on_step, start)
        meta = meta_at(start + c.warmstart.steps, figures)
        ckpt_lib.save_flat(path, params, meta)
        return meta

    # -- rollouts ----------------------------------------------------------------------------
    def rollouts(self, params, tasks, samples, temperature, rng, first_task: int = 0,
                 speech: bool = False):
        """G = `samples` episodes per task of the policy `params` (the state's params tree).

        Args:
          params: the train state's params (the critic, if any, is ignored).
          tasks: this host's tasks; first_task: the index of tasks[0] in the step's global
            list. Episode ids (which seed sampling) are global, so a host computes exactly
            what a single process would for the same tasks.
          samples, temperature, rng: G, the sampling temperature, the sampler's key.
          speech: the users speak (needs a model that hears: `model.audio`).
        Returns:
          (episodes, G per task in task order; rollout stats: generated_tokens, rounds).
        """
        if speech and self.speech is None:
            raise ValueError("a speech batch needs a model that hears: set model.audio "
                             "(e.g. configs/tiny_speech.py)")
        params = step_lib.acting_params(params)
        if jax.process_count() > 1:
            # Each host samples its own episodes on its own devices: a whole local copy of the
            # policy (the train-step params are sharded across hosts), cut over
            # rollout.tensor of its chips.
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
            if "audio" in params:
                params["audio"] = jax.device_put(params["audio"], jax.local_devices()[0])
        self.sampler.place(params["policy"])
        if "audio" in params:
            self.speech.set_encoder(params["audio"])
        r = self.config.rollout
        cfg = rollout.DecodeConfig(max_turn_tokens=r.max_turn_tokens, temperature=temperature,
                                   top_p=r.top_p, top_k=r.top_k)
        flat = [t for t in tasks for _ in range(samples)]
        ids = range(first_task * samples, first_task * samples + len(flat))
        return rollout.run_batch(flat, self.world.run_one, self.sampler, self.tok, cfg, rng,
                                 self.tool_view, episode_ids=list(ids),
                                 speech=self.speech if speech else None,
                                 max_rows=r.get("max_rows", 0))

    def evaluate(self, state, final: bool = False) -> dict:
        """pass^1 on the held-out tasks; with a model that hears, also with speaking users
        (`pass^1/speech`), side by side. `final` with rollout.final_samples=k > 0: also k
        samples per task at the training temperature (pass^1/sampled, pass^k/sampled over the
        tasks that need a write; per_task_sampled: successes of k per task).

        Returns:
          {"pass^1", "eval_turns", "per_task", "write_tasks", "pass^1/writes", ...
          [, "pass^1/speech", "eval_turns/speech"]}.
        """
        out = self._evaluate(state, speech=False, final=final)
        if self.speech is not None:
            out.update({f"{k}/speech": v for k, v in self._evaluate(state, speech=True).items()})
        return out

    def _eval_trials(self, state, samples: int, temperature: float, stream: int, speech: bool):
        """({task id: [reward per sample]}, [agent turns per episode]) over every host."""
        tasks, first = distributed.host_share(self.world.eval, even=False)
        eps, _ = self.rollouts(state["params"], tasks, samples, temperature,
                               jax.random.fold_in(self.rng, stream), first, speech)
        trials: dict[str, list[float]] = {}
        turns = []
        for host_trials, host_turns in distributed.allgather_json(
                [[[ep.task_id, ep.reward] for ep in eps], [len(ep.agent_turns) for ep in eps]]):
            for task_id, reward in host_trials:
                trials.setdefault(task_id, []).append(reward)
            turns += host_turns
        return trials, turns

    def _evaluate(self, state, speech: bool, final: bool = False) -> dict:
        r = self.config.rollout
        gold = {t.task_id: domains.gold_writes(t) for t in self.world.eval}
        writes = {t for t, w in gold.items() if w}
        trials, turns = self._eval_trials(state, r.eval_samples, r.eval_temperature, 1, speech)
        # Kinds of the write tasks only: the no-write ones already have their own figures.
        out = metrics_lib.eval_figures(
            trials, writes, {t: metrics_lib.request_kind(w) for t, w in gold.items() if w})
        out["eval_turns"] = float(np.mean(turns))
        k = r.get("final_samples", 0) if final else 0
        if k and writes:
            sampled, _ = self._eval_trials(state, k, r.temperature, 2, speech)
            out.update(metrics_lib.sampled_figures(sampled, writes, k))
        return out

    # -- one RL step -------------------------------------------------------------------------
    def rl_step(self, state, step: int) -> tuple[dict, dict]:
        """Rollouts -> judge -> advantages -> packed batch -> `rl.epochs` updates (the control,
        rl.algo=sft: sft.control_step instead).

        Args:
          state: the train state (donated: use the returned one).
          step: the 0-based RL step (picks the curriculum's batch and the sampler's key).
        Returns:
          (new state, metrics: rollout, judge, pack, loss and timing figures, global means).
        """
        c = self.config
        key = jax.random.fold_in(jax.random.fold_in(self.rng, 0), step)
        if self.sft_control:
            return sft.control_step(state, self.train_step, self.demonstrations(), key, c.seed,
                                    step, c.rl.get("sft_seconds", 0.0))
        t0 = time.perf_counter()
        compiled = metrics_lib.COMPILES.count, metrics_lib.COMPILES.seconds
        batch = self.curriculum.next(step)   # this host's block of the step's tasks
        tasks, kind = batch.tasks, batch.kind
        g = c.rollout.samples_per_task
        episodes, rstats = self.rollouts(state["params"], tasks, g, c.rollout.temperature, key,
                                         batch.first, speech=kind == "speech")
        t_roll = time.perf_counter() - t0
        rewards, turn_r, metrics = score.score_episodes(
            episodes, [t for t in tasks for _ in range(g)], c)
        t_judge = time.perf_counter()
        if c.save_episodes:
            self.save_episodes(step + 1, episodes)
        packed = batch_lib.rl_batch(c, episodes, rewards, turn_r, np.repeat(np.arange(len(tasks)), g),
                                    speech=self.speech, audio_token_id=self.audio_id or -1,
                                    train_audio=self.train_audio)
        signal = self._has_signal(packed.arrays)
        dev = step_lib.device_batch(packed.arrays, self.keys, self.mesh, self.rules) if signal \
            else None
        t_pack = time.perf_counter()
        if signal:
            if self.ppo:
                _, dev["values"] = self.score(state["params"], dev)
            if c.rl.kl_coef:
                # The PPO critic rides along unused: the score fn is compiled for the full params
                # tree.
                dev["ref_logprobs"], _ = self.score({**state["params"], **self.ref_params}, dev)
            for epoch in range(c.rl.epochs):
                state, m = self.train_step(state, dev, jax.random.fold_in(key, epoch))
            m = jax.device_get(m)   # waits for the update: the clock below sees it
        else:
            # Every advantage is 0 (each group tied): the step would compute a full forward and
            # backward only to discard them (rl.skip_no_signal). Skipped here instead: no loss,
            # gradient or entropy figures for this step, and the optimizer does not move.
            state, m = step_lib.at_step(state, step + 1), {"skipped": 1.0, "nonfinite": 0.0}
        t_update = time.perf_counter()
        # Where a step's time goes (the rollout's rounds: prefill, decode, and the episodes' host
        # work between them: sandbox, user simulator, rendering).
        metrics.update({
            "time/rollout_s": t_roll,
            **{f"time/rollout_{k}": rstats[k] for k in ("prefill_s", "decode_s", "host_s")},
            "time/judge_s": t_judge - t0 - t_roll, "time/pack_s": t_pack - t_judge,
            "time/update_s": t_update - t_pack,
            "rollout/gen_tokens": rstats["generated_tokens"], "rollout/rounds": rstats["rounds"],
            "rollout/agent_turns": float(np.mean([len(ep.agent_turns) for ep in episodes])),
            # e.g. the dialogue outgrew rollout.cache_len (ContextFull): worth a look when > 0
            "rollout/agent_error": float(np.mean([ep.termination == "agent_error" for ep in episodes])),
            "rollout/malformed": float(np.mean([sum(v for k, v in ep.counters.items()
                                                    if k.startswith("malformed")) for ep in episodes])),
            "pack/fill": packed.stats["fill"], "pack/truncated": packed.stats["truncated"],
            "pack/dropped": packed.stats["dropped"], "math_batch": float(tasks[0].domain == "math"),
            "speech_batch": float(kind == "speech"),
        })
        # Host metrics: every host ran the same number of episodes, so a plain mean of host
        # means is the global mean (counts such as gen_tokens become per-host averages).
        hosts = distributed.allgather_json(metrics)
        metrics = {k: float(np.mean([h[k] for h in hosts])) for k in hosts[0]
                   if all(k in h for h in hosts)}
        metrics.update({k: float(v) for k, v in m.items()})  # global already
        metrics["time/step_s"] = time.perf_counter() - t0
        compiles = metrics_lib.COMPILES
        metrics["compile/count"] = compiles.count - compiled[0]
        metrics["compile/seconds"] = compiles.seconds - compiled[1]
        if self._stepped and metrics["compile/count"]:   # the first step compiles everything
            log.info("step %d compiled %d programs (%.1f s): %s", step + 1,
                     metrics["compile/count"], metrics["compile/seconds"],
                     ", ".join(compiles.names[compiled[0]:]))
        self._stepped = True
        return state, metrics

    def _has_signal(self, arrays) -> bool:
        """Whether any host's packed batch has a non-zero advantage on a trained token (always,
        for PPO, whose advantages come from the critic in the step, or with rl.skip_no_signal
        off)."""
        if self.ppo or not self.config.rl.skip_no_signal:
            return True
        here = bool(np.any((arrays["advantages"] != 0) & arrays["loss_mask"].astype(bool)))
        return any(distributed.allgather_json(here))

    def save_episodes(self, step: int, episodes) -> None:
        """Each host writes its own episodes (inputs of `python -m tarl_jax.judge.reliability`)."""
        out = self.workdir / "episodes"
        out.mkdir(exist_ok=True)
        path = out / f"step{step:06d}_host{jax.process_index()}.jsonl"
        path.write_text("".join(ep.to_json() + "\n" for ep in episodes))

    def run(self) -> tuple[dict, dict]:
        """Train to `config.total_steps`, evaluating every `eval_every` steps and at the end.

        Returns:
          (final train state, meta: per-step metrics history, evaluations, warm-start figures).
        """
        c = self.config
        state, meta = self.init_or_restore()
        start = int(jax.device_get(state["step"]))
        # Opened after the restore: rows of steps the checkpoint does not hold are dropped.
        self.writer = metrics_lib.MetricWriter(self.workdir, start) if jax.process_index() == 0 else None
        nonfinite = 0
        try:
            for step in metrics_lib.progress(range(start, c.total_steps), "rl", initial=start,
                                             total=c.total_steps):
                if step + 1 == c.get("profile_step", 0):
                    # Without Python's own calls: they were 70% of a demo step's events, and a
                    # trace keeps 1M, so the update fell off its end.
                    opts = jax.profiler.ProfileOptions()
                    opts.python_tracer_level = 0
                    with jax.profiler.trace(str(self.workdir / "profile"), profiler_options=opts):
                        state, metrics = self.rl_step(state, step)
                    log.info("profile of step %d in %s", step + 1, self.workdir / "profile")
                else:
                    state, metrics = self.rl_step(state, step)
                done = step + 1
                nonfinite = nonfinite + 1 if metrics.get("nonfinite") else 0
                if nonfinite:
                    log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); "
                                "the update was not applied", done, metrics["loss"],
                                metrics["grad_norm"])
                if nonfinite >= c.rl.get("max_nonfinite", 3):
                    raise FloatingPointError(
                        f"{nonfinite} RL steps in a row (to step {done}) had a non-finite loss or "
                        "gradient and were not applied; the last checkpoint holds finite params. "
                        "Lower optim.lr or optim.clip_norm, or check the model "
                        "and batch (rl.max_nonfinite sets how many are tolerated)")
                meta["history"].append({"step": done, **metrics})
                if done % c.eval_every == 0 or done == c.total_steps:
                    ev = self.evaluate(state, final=done == c.total_steps)
                    meta["evals"].append({"step": done, **ev})
                    metrics.update({f"eval/{k}": v for k, v in ev.items()
                                    if isinstance(v, (int, float))})
                if self.writer:
                    self.writer.write(done, metrics)
                meta["curriculum"] = self.curriculum.get_state()
                self.ckpt.save(done, state, meta, force=done == c.total_steps)
        finally:
            self.ckpt.close()
            if self.writer:
                self.writer.close()
        if self.writer:
            # A tuning run evaluates on validation: its summary must not read as held-out.
            split = "validation" if c.world.get("eval_split") == "validation" else "held-out"
            metrics_lib.plot(meta, self.workdir / "reward.png", split)
            (self.workdir / "summary.json").write_text(json.dumps(
                {"evals": meta["evals"], "warmstart": meta.get("warmstart"),
                 "limits": self.limits}, indent=1))
            (self.workdir / "summary.txt").write_text(
                metrics_lib.summary(meta, self.workdir, split) + "\n")
        return state, meta
