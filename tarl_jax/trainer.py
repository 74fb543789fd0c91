"""The TARL training loop, top to bottom.

    warm start   SFT on the scripted expert's dialogues (optional)
    every step   tasks from the curriculum -> G rollouts each (jitted KV-cache sampler <->
                 sandbox episode) -> judge every agent turn -> reward -> advantages -> pack
                 -> one jitted, sharded update
    periodically pass^k on held-out tasks, an orbax checkpoint, metrics (JSONL + TensorBoard)

Exact resume: everything random is a pure function of (seed, step) — the sampler's key, the
update's rng — and the checkpoint holds the train state and the curriculum's position (its JSON
metadata), so a run killed at any point and restarted continues with the same numbers it would
have produced.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from tarl_jax import distributed, rollout, sharding
from tarl_jax.judge import reliability
from tarl_jax.judge import reward as judge_reward
from tarl_jax.judge import rules as rule_judge
from tarl_jax.models import qwen
from tarl_jax.models import tokenizer as tokenizer_lib
from tarl_jax.rl import advantages as adv_lib
from tarl_jax.rl import checkpoint as ckpt_lib
from tarl_jax.rl import curriculum as curriculum_lib
from tarl_jax.rl import losses, pack
from tarl_jax.rl import step as step_lib
from tarl_jax.sampler import Sampler
from tarl_jax.sandbox import math as math_tasks
from tarl_jax.sandbox import reward as sandbox_reward
from tarl_jax.sandbox import synth
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.episode import run_episode
from tarl_jax.sandbox.user import OfflineUser

log = logging.getLogger("tarl_jax")


# ---------------------------------------------------------------------------- building blocks

def load_model(mcfg, mesh, rules, seed: int, with_audio: bool = False):
    """(tokenizer, model config, params on the mesh) from a preset, an HF dir or a GGUF file.

    `mcfg.audio` (speech mode): "" none; an audio preset ("tiny", "micro": random encoder over
    the decoder preset); "hf": `hf_dir` is a Qwen2.5-Omni checkpoint, its thinker's decoder is
    the policy. with_audio=True adds a 4th value: (ThinkerConfig, audio encoder params) or None.
    """
    import flax.linen as nn

    from tarl_jax.models import audio as audio_model
    from tarl_jax.models import hf, omni, presets
    tok_dir = (tokenizer_lib.tiny_tokenizer_dir() if mcfg.tokenizer == "tiny" else
               tokenizer_lib.qwen3_tokenizer_dir() if mcfg.tokenizer == "qwen3" else
               mcfg.hf_dir if mcfg.tokenizer == "hf" else mcfg.tokenizer)
    tok = tokenizer_lib.ChatTokenizer(tok_dir)
    overrides = dict(dtype=mcfg.dtype, scan_layers=mcfg.scan_layers, remat=mcfg.remat,
                     attn_chunk=mcfg.get("attn_chunk", 0))
    audio_kind = mcfg.get("audio", "")
    frozen = not mcfg.get("train_audio", False)
    if audio_kind and tok.audio_id is None:
        raise ValueError(f"model.audio={audio_kind!r} needs a tokenizer with <|AUDIO|> (an Omni "
                         f"checkpoint's, or 'tiny'); {tok_dir} has none")
    thinker = None
    if audio_kind == "hf":
        tcfg = omni.ThinkerConfig.from_hf(
            json.loads((pathlib.Path(mcfg.hf_dir) / "config.json").read_text()),
            text_overrides=overrides, freeze_audio=frozen)
        tcfg, both = omni.load_thinker(mcfg.hf_dir, tcfg, mesh=mesh, rules=rules)
        cfg, params, thinker = tcfg.text, both["model"], (tcfg, both["audio_tower"])
    elif mcfg.hf_dir:
        cfg, params = hf.load_hf(mcfg.hf_dir, mesh=mesh, rules=rules, overrides=overrides)
    elif mcfg.gguf:
        cfg, params = hf.load_gguf(mcfg.gguf, mesh=mesh, rules=rules, overrides=overrides)
    else:
        cfg = dataclasses.replace(presets.get(mcfg.preset), **overrides)
        if cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"model preset {mcfg.preset!r} has vocab {cfg.vocab_size} < "
                             f"tokenizer's {tok.vocab_size}")
        shardings = sharding.logical_sharding(qwen.logical_axes(cfg), mesh, rules)
        params = jax.jit(lambda k: qwen.init_params(cfg, k), out_shardings=shardings)(
            jax.random.key(seed))
    if audio_kind and thinker is None:
        tcfg = omni.ThinkerConfig(audio=presets.audio(audio_kind, cfg.hidden_size), text=cfg,
                                  audio_token_id=tok.audio_id, freeze_audio=frozen)
        thinker = (tcfg, nn.unbox(audio_model.boxed_params(tcfg.audio, jax.random.key(seed + 1))))
    if thinker is not None and thinker[0].audio_token_id != tok.audio_id:
        raise ValueError(f"the checkpoint's audio_token_id {thinker[0].audio_token_id} is not the "
                         f"tokenizer's <|AUDIO|> id {tok.audio_id}")
    return (tok, cfg, params, thinker) if with_audio else (tok, cfg, params)


@dataclasses.dataclass
class World:
    """What rollouts need: tool-use train/eval tasks, a way to make envs and users. RL batches
    come from the curriculum (rl/curriculum.py); `train` feeds the warm start."""
    world: Any
    train: list
    eval: list
    user_cfg: Any
    max_steps: int
    reward_variant: str
    system_prompt: str = ""     # replaces the domain policy as the agent's system prompt

    def run_one(self, task, agent, max_steps: int | None = None):
        if task.domain == "math":
            return math_tasks.run_math_episode(task, agent)
        env = Env(self.world, task)
        if self.system_prompt:
            env.policy = self.system_prompt
        return run_episode(env, task, agent, self.make_user(task), max_steps or self.max_steps,
                           self.reward_variant)

    def make_user(self, task):
        if self.user_cfg.kind == "offline":
            return OfflineUser(task, self.world)
        if self.user_cfg.kind == "llm":
            from tarl_jax.sandbox.user import LLMUser, LLMUserConfig
            return LLMUser(task.instruction, LLMUserConfig(
                model=self.user_cfg.model, base_url=self.user_cfg.base_url,
                api_key=os.environ.get(self.user_cfg.api_key_env, "EMPTY"),
                temperature=self.user_cfg.temperature))
        raise ValueError(f"user.kind={self.user_cfg.kind!r}: choose offline | llm")


def build_world(config) -> World:
    w = config.world
    if w.source == "synthetic" and not w.data_dir:
        world, tasks = synth.make_world(synth.SynthConfig(**w.synth))
        train, eval_ = tasks[:-w.eval_tasks], tasks[-w.eval_tasks:]
    else:
        from tarl_jax.sandbox.db import World as DbWorld
        from tarl_jax.sandbox.tasks import load_tasks
        root = pathlib.Path(w.data_dir)
        world = DbWorld.from_dir(w.domain, root)
        v1 = root / "v1" / w.domain if (root / "v1").is_dir() else root
        train = load_tasks(v1 / "tasks_train.json", w.domain)
        eval_ = load_tasks(v1 / "tasks_test.json", w.domain)[:w.eval_tasks]
    return World(world, train, eval_, config.user, w.max_steps, w.reward_variant,
                 w.system_prompt)


# ---------------------------------------------------------------------------- rewards

def score_episodes(episodes, tasks, config) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Judge every episode and combine with its outcome.

    Returns (trajectory rewards [N], per-turn rewards [N, K] or None, metrics)."""
    outcomes = [ep.reward for ep in episodes]
    kind = config.judge.kind
    if kind not in ("none", "rule", "llm"):
        raise ValueError(f"judge.kind={kind!r}: choose none | rule | llm")
    judged = [i for i, ep in enumerate(episodes)
              if kind != "none" and ep.mode != "math" and ep.agent_turns]
    judgements = [None] * len(episodes)
    metrics = {}
    if kind == "rule":
        for i in judged:
            judgements[i] = rule_judge.judge(tasks[i], episodes[i])
    elif kind == "llm" and judged:
        from tarl_jax.judge import llm as llm_judge
        # judge.llm.repeats > 1: the reward uses the majority vote of the repeats.
        found, runs, stats = llm_judge.judge_repeated(
            [(tasks[i], episodes[i]) for i in judged],
            {k: (None if v == "" else v) for k, v in config.judge.llm.items()})
        for i, j in zip(judged, found):
            judgements[i] = j  # None: dropped by the configured fallback, outcome-only reward
        metrics.update({f"judge/{k}": float(v) for k, v in stats.items()
                        if isinstance(v, (int, float))})
        if len(runs) > 1:
            rep = reliability.repeat_variance(runs, [outcomes[i] for i in judged], dict(config.reward))
            metrics.update({f"judge/repeat_{k}": float(v) for k, v in rep.items()
                            if v is not None and k != "repeats"})
        # The rule judge as a free yardstick: how far does the LLM judge agree with it? Only the
        # LLM's own verdicts count (a fallback *is* the rule judge's and would read as agreement).
        own = [i for i in judged if judgements[i] is not None
               and "fallback_from" not in judgements[i].meta]
        if own:
            agree = reliability.judge_agreement(
                [judgements[i] for i in own], [rule_judge.judge(tasks[i], episodes[i]) for i in own])
            for key in ("turn_exact_agreement", "turn_kappa", "neg_presence_agreement"):
                if agree[key] is not None:
                    metrics[f"judge/llm_vs_rule/{key}"] = float(agree[key])
    w = dict(config.reward)
    rewards, per_turn = [], []
    for ep, j, o in zip(episodes, judgements, outcomes):
        scores = j.scores if j is not None else [0] * len(ep.agent_turns)
        if j is None:  # outcome only (plain GRPO; math)
            rewards.append(w["w_out"] * o)
            per_turn.append([w["w_out"] * o / max(len(scores), 1)] * max(len(scores), 1))
        else:
            rewards.append(judge_reward.trajectory_reward(scores, o, w))
            per_turn.append(judge_reward.turn_rewards(scores, o, w))
    k = max(len(r) for r in per_turn)
    turn_r = np.zeros((len(episodes), k), np.float32)
    for i, r in enumerate(per_turn):
        turn_r[i, :len(r)] = r
    metrics.update({"outcome": float(np.mean(outcomes)), "reward": float(np.mean(rewards))})
    judged = [j for j in judgements if j is not None]
    if judged:
        agree = reliability.outcome_agreement(judgements, outcomes)
        metrics.update({"judge/neg_rate": float(np.mean([-1 in j.scores for j in judged])),
                        "judge/mean_score": float(np.mean([np.mean(j.scores) for j in judged]))})
        for key in ("p_fail_given_neg", "p_clean_given_success", "accuracy"):
            if agree[key] is not None:
                metrics[f"judge/{key}"] = agree[key]
    return np.asarray(rewards, np.float32), turn_r, metrics


def episode_advantages(config, rewards, turn_rewards, episodes, group_ids):
    """[N] (trajectory credit) or [N, K] (per-turn) advantages; PPO gets its own in the step."""
    algo, credit = config.rl.algo, config.rl.credit
    if algo == "ppo":
        return None
    if credit == "trajectory":
        return np.asarray(adv_lib.compute_advantages(algo, rewards, group_ids))
    mask = np.zeros(turn_rewards.shape, bool)
    for i, ep in enumerate(episodes):
        mask[i, :max(len(ep.agent_turns), 1)] = True
    return np.asarray(adv_lib.compute_advantages(algo, turn_rewards, group_ids,
                                                 credit="per_turn", turn_mask=mask,
                                                 gamma=config.rl.gamma))


def make_speech_view(config, thinker):
    """The speech front end (TTS + the audio encoder's embeddings) when the model hears audio."""
    if thinker is None:
        return None
    from tarl_jax.sandbox import speech
    from tarl_jax.speech_view import SpeechView
    s = config.speech
    conditions = None
    if s.snr_db is not None or s.telephony:
        conditions = speech.Conditions(snr_db=s.snr_db, telephony=s.telephony, seed=config.seed)
    kwargs = {}
    if s.engine == "openai":
        kwargs = dict(model=s.model or "gpt-4o-mini-tts", base_url=s.base_url or None,
                      api_key=os.environ.get(s.api_key_env) or None)
    tts = speech.TTS(s.engine, cache_dir=s.cache_dir or None, **kwargs)
    tcfg, audio_params = thinker
    return SpeechView(tts, tcfg, audio_params, conditions=conditions, seed=config.seed,
                      max_items=s.max_items)


# ---------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        c = config
        self.rules = sharding.rules_from_config(c.rules)
        self.mesh = sharding.make_mesh(dict(c.mesh))
        self.tok, self.model_cfg, params, thinker = load_model(c.model, self.mesh, self.rules,
                                                               c.seed, with_audio=True)
        self.speech = make_speech_view(c, thinker)   # None: text only
        self.audio_id = self.tok.audio_id if self.speech else None
        # model.train_audio: RL updates the audio encoder too (params["audio"]); the step encodes
        # the batch's log-mel itself and rollouts re-encode with each new version.
        self.train_audio = bool(c.model.get("train_audio", False))
        if self.train_audio and self.speech is None:
            raise ValueError("model.train_audio=True needs a model that hears: set model.audio")
        audio_cfg = thinker[0].audio if self.train_audio else None
        self._initial_audio = thinker[1] if self.train_audio else None
        self.world = build_world(c)
        self.curriculum = curriculum_lib.Curriculum.from_config(
            c, c.curriculum.data_dir or self.workdir / "data")
        self.batch_kind = None   # text | speech | math: the kind of the step's batch
        self.ppo = c.rl.algo == "ppo"
        self.step_cfg = step_lib.StepConfig(
            loss=losses.LossConfig(policy_loss=c.rl.policy_loss, clip_low=c.rl.clip_low,
                                   clip_high=c.rl.clip_high, agg=c.rl.agg,
                                   max_len=max(c.pack.seq_lens), kl_coef=c.rl.kl_coef,
                                   kl_estimator=c.rl.kl_estimator),
            logprob_chunk=c.rl.logprob_chunk, microbatches=c.rl.microbatches,
            temperature=c.rollout.temperature, ppo=self.ppo, gamma=c.rl.gamma, lam=c.rl.lam,
            audio_token_id=self.audio_id or -1, audio=audio_cfg)
        self.optimizer = step_lib.make_optimizer(
            c.optim.lr, c.optim.warmup_steps, c.total_steps, c.optim.schedule, c.optim.clip_norm,
            c.optim.weight_decay, critic_lr=c.optim.critic_lr if self.ppo else None)
        self.state_sh = step_lib.state_shardings(self.model_cfg, self.optimizer, self.ppo,
                                                 self.mesh, self.rules, audio_cfg)
        self.keys = (step_lib.BATCH_KEYS + step_lib.GATHER_KEYS
                     + (step_lib.PPO_KEYS if self.ppo else ())
                     + ((step_lib.MEL_KEYS if self.train_audio else step_lib.AUDIO_KEYS)
                        if self.speech else ()))
        self.train_step = step_lib.jit_train_step(self.model_cfg, self.step_cfg, self.optimizer,
                                                  self.mesh, self.state_sh, self.keys, self.rules)
        self.score = step_lib.make_score_fn(self.model_cfg, self.step_cfg, self.mesh,
                                            self.state_sh["params"], self.keys, self.rules)
        self.ckpt = ckpt_lib.Checkpointer(str(self.workdir / "checkpoints"),
                                          save_every=c.checkpoint_every)
        self.writer = MetricWriter(self.workdir) if jax.process_index() == 0 else None
        self.rng = jax.random.key(c.seed)
        self.sampler = Sampler(self.model_cfg, params, cache_len=c.rollout.cache_len,
                               audio_token_id=self.audio_id)
        self._initial_params = params

    # -- state ---------------------------------------------------------------------------
    def init_or_restore(self, resume_curriculum: bool = True) -> tuple[dict, dict]:
        """The latest checkpoint's state (and curriculum position, unless only evaluating a
        policy, possibly on other tasks than it was trained on), or a fresh start."""
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
                self.ref_params = ckpt_lib.restore_params(self.workdir / "reference",
                                                          _without_critic(abstract["params"]))
            log.info("resumed from step %d in %s", latest, self.ckpt.directory)
            return state, meta
        params = self._initial_params
        meta = {"history": [], "evals": []}
        if self.config.warmstart.steps:
            params, sft = self.warm_start(params)
            meta["warmstart"] = sft
        state = step_lib.init_state(params, self.optimizer, self.model_cfg, self.ppo, self.state_sh,
                                    self._initial_audio)
        if self.config.rl.kl_coef:
            # The KL anchor is the policy RL starts from (after the warm start), kept on disk so
            # a resumed run anchors to the same weights.
            # A copy: the train step donates (reuses) the state's buffers.
            self.ref_params = jax.tree.map(lambda x: x.copy(), _without_critic(state["params"]))
            ckpt_lib.save_params(self.workdir / "reference", self.ref_params)
        meta["evals"].append({"step": 0, **self.evaluate(state)})
        meta["curriculum"] = self.curriculum.get_state()
        self.ckpt.save(0, state, meta, force=True)
        return state, meta

    # -- warm start ------------------------------------------------------------------------
    def warm_start(self, params) -> tuple[Any, dict]:
        """SFT on expert dialogues, tokenised exactly as a rollout would feed them."""
        c = self.config.warmstart
        tasks, _ = distributed.host_share(self.world.train[:c.episodes])
        view = _tool_view(self.config)
        episodes = []
        for i, t in enumerate(tasks):
            # In speech mode every other demonstration is heard: SFT covers both modalities.
            hear = self.speech if i % 2 else None
            teacher = rollout.TeacherAgent(synth.ExpertAgent(t), self.tok, tool_view=view,
                                           enable_thinking=False, speech=hear, user_id=t.user_id)
            # The expert gets tau-bench's 30-step cap even where rollouts are cut shorter.
            episodes.append(self.world.run_one(t, teacher, 30))
            if hear is not None:
                rollout.mark_speech(episodes[-1])
        ok = [ep for ep in episodes if ep.reward >= 1]
        log.info("warm start: %d/%d expert episodes solved; training on them", len(ok), len(episodes))
        optimizer = step_lib.make_optimizer(c.lr, c.warmup_steps, c.steps, "cosine", 1.0)
        cfg = dataclasses.replace(self.step_cfg, ppo=False, temperature=1.0,
                                  loss=losses.LossConfig(policy_loss="pg", agg="token_mean"))
        sh = step_lib.state_shardings(self.model_cfg, optimizer, False, self.mesh, self.rules)
        state = step_lib.init_state(params, optimizer, self.model_cfg, False, sh)
        keys = (step_lib.BATCH_KEYS + step_lib.GATHER_KEYS
                + (step_lib.AUDIO_KEYS if self.speech else ()))
        fn = step_lib.jit_train_step(self.model_cfg, cfg, optimizer, self.mesh, sh, keys,
                                     self.rules)
        rng = np.random.default_rng([self.config.seed, jax.process_index()])
        losses_seen = []
        rows = c.batch_rows // jax.process_count()   # global batch rows, split over hosts
        for i in progress(range(c.steps), "warm start"):
            pick = rng.choice(len(ok), size=min(rows, len(ok)), replace=False)
            batch = pack.pack([ok[j] for j in pick], np.ones(len(pick), np.float32),
                              seq_lens=(c.seq_len,), rows=(rows,), overflow="truncate",
                              audio=self.speech, audio_token_id=self.audio_id or -1)
            _agree_widths(batch.arrays)
            if not batch.stats["policy_tokens"]:
                log.warning("warm start step %d: no assistant token within warmstart.seq_len=%d "
                            "(the prompts are longer); raise it", i, c.seq_len)
            state, m = fn(state, step_lib.device_batch(batch.arrays, keys, self.mesh, self.rules),
                          jax.random.key(i))
            losses_seen.append(float(m["loss"]))
        log.info("warm start: NLL %.3f -> %.3f over %d steps", losses_seen[0], losses_seen[-1], c.steps)
        return state["params"]["policy"], {"nll_first": losses_seen[0], "nll_last": losses_seen[-1],
                                           "expert_solved": len(ok), "expert_episodes": len(episodes)}

    # -- rollouts ----------------------------------------------------------------------------
    def rollouts(self, params, tasks, samples, temperature, rng, first_task: int = 0,
                 speech: bool = False):
        """G = `samples` episodes per task of the policy `params` (the state's params tree);
        episode ids (which seed sampling) are global, so a host computes exactly what a single
        process would for the same tasks. `speech`: the users speak (needs a model that hears:
        `model.audio`)."""
        if speech and self.speech is None:
            raise ValueError("a speech batch needs a model that hears: set model.audio "
                             "(e.g. configs/tiny_speech.py)")
        params = _without_critic(params)
        if jax.process_count() > 1:
            # Each host samples its own episodes on its own devices: a full local replica of
            # the policy (the train-step params are sharded across hosts).
            from jax.experimental import multihost_utils
            params = jax.device_put(multihost_utils.process_allgather(params, tiled=True),
                                    jax.local_devices()[0])
        self.sampler.params = params["policy"]
        if "audio" in params:
            self.speech.set_encoder(params["audio"])
        cfg = rollout.DecodeConfig(max_turn_tokens=self.config.rollout.max_turn_tokens,
                                   temperature=temperature, top_p=self.config.rollout.top_p,
                                   top_k=self.config.rollout.top_k)
        flat = [t for t in tasks for _ in range(samples)]
        ids = range(first_task * samples, first_task * samples + len(flat))
        return rollout.run_batch(flat, self.world.run_one, self.sampler, self.tok, cfg, rng,
                                 _tool_view(self.config), episode_ids=list(ids),
                                 speech=self.speech if speech else None)

    def evaluate(self, state) -> dict:
        """pass^1 on the held-out tasks; with a model that hears, also with speaking users
        (`pass^1/speech`), side by side."""
        out = self._evaluate(state, speech=False)
        if self.speech is not None:
            out.update({f"{k}/speech": v for k, v in self._evaluate(state, speech=True).items()})
        return out

    def _evaluate(self, state, speech: bool) -> dict:
        r = self.config.rollout
        tasks, first = distributed.host_share(self.world.eval)
        eps, _ = self.rollouts(state["params"], tasks, r.eval_samples,
                               r.eval_temperature, jax.random.fold_in(self.rng, 1), first, speech)
        trials: dict[str, list[float]] = {}
        turns = []
        for host_trials, host_turns in distributed.allgather_json(
                [[[ep.task_id, ep.reward] for ep in eps], [len(ep.agent_turns) for ep in eps]]):
            for task_id, reward in host_trials:
                trials.setdefault(task_id, []).append(reward)
            turns += host_turns
        return {"pass^1": sandbox_reward.pass_hat_k(trials, 1), "eval_turns": float(np.mean(turns))}

    def pack(self, episodes, advs) -> pack.Packed:
        """Pack this host's episodes into a shape every host agrees on: each host's rows are its
        slice of the global batch, so all hosts need the same [rows, T]. Row buckets in the
        config are global; a host gets bucket / host count rows."""
        c, hosts = self.config.pack, jax.process_count()
        rows = [r // hosts for r in c.rows if r % hosts == 0]
        audio = dict(audio=self.speech, audio_token_id=self.audio_id or -1,
                     audio_as="mel" if self.train_audio else "embeddings")
        packed = pack.pack(episodes, advs, seq_lens=c.seq_lens, rows=rows, overflow=c.overflow,
                           **audio)
        shapes = distributed.allgather_json([packed.stats["seq_len"], packed.stats["rows"]])
        t_len, n_rows = max(s[0] for s in shapes), max(s[1] for s in shapes)
        if (t_len, n_rows) != (packed.stats["seq_len"], packed.stats["rows"]):
            packed = pack.pack(episodes, advs, seq_lens=(t_len,), rows=(n_rows,),
                               overflow=c.overflow, **audio)
        _agree_widths(packed.arrays)
        return packed

    # -- one RL step -------------------------------------------------------------------------
    def rl_step(self, state, step: int) -> tuple[dict, dict]:
        c = self.config
        t0 = time.perf_counter()
        batch = self.curriculum.next(step)   # this host's block of the step's tasks
        tasks, first, self.batch_kind = batch.tasks, batch.first, batch.kind
        key = jax.random.fold_in(jax.random.fold_in(self.rng, 0), step)
        episodes, rstats = self.rollouts(state["params"], tasks, c.rollout.samples_per_task,
                                         c.rollout.temperature, key, first,
                                         speech=self.batch_kind == "speech")
        t_roll = time.perf_counter() - t0
        flat_tasks = [t for t in tasks for _ in range(c.rollout.samples_per_task)]
        group_ids = np.repeat(np.arange(len(tasks)), c.rollout.samples_per_task)
        rewards, turn_r, metrics = score_episodes(episodes, flat_tasks, c)
        trainable = [i for i, ep in enumerate(episodes) if ep.agent_turns]
        advs = episode_advantages(c, rewards, turn_r, episodes, group_ids)
        eps = [episodes[i] for i in trainable]
        if advs is not None:
            advs = advs[trainable]
        if c.save_episodes:
            self.save_episodes(step + 1, episodes)
        packed = self.pack(eps, advs)
        arrays = packed.arrays
        if self.ppo:
            values = (rewards[trainable] if c.rl.credit == "trajectory" else turn_r[trainable])
            arrays["token_rewards"] = pack.scatter_turn_values(arrays, values, at="last")
            arrays["values"] = np.zeros_like(arrays["advantages"])
        batch = step_lib.device_batch(arrays, self.keys, self.mesh, self.rules)
        if self.ppo:
            _, values = self.score(state["params"], batch)
            batch["values"] = values
        if c.rl.kl_coef:
            # The PPO critic rides along unused: the score fn is compiled for the full params tree.
            ref_logp, _ = self.score({**state["params"], **self.ref_params}, batch)
            batch["ref_logprobs"] = ref_logp
        for epoch in range(c.rl.epochs):
            state, m = self.train_step(state, batch, jax.random.fold_in(key, epoch))
        metrics.update({
            "time/rollout_s": t_roll,
            "rollout/gen_tokens": rstats["generated_tokens"], "rollout/rounds": rstats["rounds"],
            "rollout/agent_turns": float(np.mean([len(ep.agent_turns) for ep in episodes])),
            # e.g. the dialogue outgrew rollout.cache_len (ContextFull): worth a look when > 0
            "rollout/agent_error": float(np.mean([ep.termination == "agent_error" for ep in episodes])),
            "rollout/malformed": float(np.mean([sum(v for k, v in ep.counters.items()
                                                    if k.startswith("malformed")) for ep in episodes])),
            "pack/fill": packed.stats["fill"], "pack/truncated": packed.stats["truncated"],
            "pack/dropped": packed.stats["dropped"], "math_batch": float(tasks[0].domain == "math"),
            "speech_batch": float(self.batch_kind == "speech"),
        })
        # Host metrics: every host ran the same number of episodes, so a plain mean of host
        # means is the global mean (counts such as gen_tokens become per-host averages).
        hosts = distributed.allgather_json(metrics)
        metrics = {k: float(np.mean([h[k] for h in hosts])) for k in hosts[0]
                   if all(k in h for h in hosts)}
        metrics.update({k: float(v) for k, v in jax.device_get(m).items()})  # global already
        metrics["time/step_s"] = time.perf_counter() - t0
        return state, metrics

    def save_episodes(self, step: int, episodes) -> None:
        """Each host writes its own episodes (inputs of `python -m tarl_jax.judge.reliability`)."""
        out = self.workdir / "episodes"
        out.mkdir(exist_ok=True)
        path = out / f"step{step:06d}_host{jax.process_index()}.jsonl"
        path.write_text("".join(ep.to_json() + "\n" for ep in episodes))

    def run(self):
        c = self.config
        state, meta = self.init_or_restore()
        start = int(jax.device_get(state["step"]))
        try:
            for step in progress(range(start, c.total_steps), "rl", initial=start, total=c.total_steps):
                state, metrics = self.rl_step(state, step)
                done = step + 1
                meta["history"].append({"step": done, **metrics})
                if done % c.eval_every == 0 or done == c.total_steps:
                    ev = self.evaluate(state)
                    meta["evals"].append({"step": done, **ev})
                    metrics.update({f"eval/{k}": v for k, v in ev.items()})
                if self.writer:
                    self.writer.write(done, metrics)
                meta["curriculum"] = self.curriculum.get_state()
                self.ckpt.save(done, state, meta, force=done == c.total_steps)
        finally:
            self.ckpt.close()
            if self.writer:
                self.writer.close()
        if self.writer:
            plot(meta, self.workdir / "reward.png")
            (self.workdir / "summary.json").write_text(json.dumps(
                {"evals": meta["evals"], "warmstart": meta.get("warmstart")}, indent=1))
        return state, meta


def _agree_widths(arrays: dict) -> None:
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


def _without_critic(params: dict) -> dict:
    """The params the policy acts with (rollouts; the KL anchor keeps these): all but the critic."""
    return {k: v for k, v in params.items() if k != "value"}


def _tool_view(config):
    if config.world.tool_view not in rollout.TOOL_VIEWS:
        raise ValueError(f"world.tool_view={config.world.tool_view!r}: choose from "
                         f"{sorted(rollout.TOOL_VIEWS)}")
    return rollout.TOOL_VIEWS[config.world.tool_view]


# ---------------------------------------------------------------------------- reporting

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
