"""What a run is built from: the model and its tokenizer, the task world and its users, the
speech front end. One owner each: the trainer, `main`, the server and the benchmarks all load
models through `load_model`, and every tau-bench directory is read through `sandbox.tasks`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import jax

from tarl_jax import rollout, sharding
from tarl_jax.models import qwen
from tarl_jax.models import tokenizer as tokenizer_lib
from tarl_jax.sandbox import math as math_tasks
from tarl_jax.sandbox import synth
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.episode import run_episode
from tarl_jax.sandbox.user import OfflineUser

# ---------------------------------------------------------------------------- model + tokenizer

MODEL_DEFAULTS = dict(preset="tiny", hf_dir="", gguf="", orbax="", step=None, tokenizer="",
                      dtype="float32", scan_layers=False, remat="none", attn_chunk=0, attn_sparse=False,
                      audio="", train_audio=False)


def tokenizer_dir(name: str, hf_dir: str = "") -> pathlib.Path | str:
    """tiny | qwen3 | hf (hf_dir's own) | "" (hf_dir's own when it has one, else tiny) | a dir."""
    if name == "" and hf_dir and (pathlib.Path(hf_dir) / "tokenizer.json").is_file():
        name = "hf"
    if name in ("", "tiny"):
        return tokenizer_lib.tiny_tokenizer_dir()
    if name == "qwen3":
        return tokenizer_lib.qwen3_tokenizer_dir()
    if name == "hf":
        if not hf_dir:
            raise ValueError("model.tokenizer='hf' needs model.hf_dir")
        return hf_dir
    return name


def model_shape(name: str) -> qwen.DecoderConfig:
    """A preset name (models/presets.py) or an HF config.json (or its directory)."""
    from tarl_jax.models import presets
    if name in presets.PRESETS:
        return presets.get(name)
    path = pathlib.Path(name)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise KeyError(f"model preset {name!r} is neither a preset ({sorted(presets.PRESETS)}) "
                       "nor an HF config.json")
    return qwen.DecoderConfig.from_hf(json.loads(path.read_text()))


def load_model(mcfg: Mapping, mesh=None, rules=None, seed: int = 0, with_audio: bool = False):
    """The policy's tokenizer, architecture and weights, placed on `mesh`.

    Args:
      mcfg: the config's `model` section (keys of MODEL_DEFAULTS; missing ones take those).
        The weights come from `orbax` (a trainer workdir: params["policy"] of its latest
        committed checkpoint, or `step`, in the shape of `hf_dir`'s config or `preset`),
        `hf_dir` (HF safetensors), `gguf` (llama.cpp), else random weights of `preset` (a preset
        name or an HF config.json). `audio` (speech mode): "" none, an audio preset ("tiny", "micro": a
        random encoder over the decoder) or "hf" (`hf_dir` is a Qwen2.5-Omni checkpoint whose
        thinker's decoder is the policy).
      mesh, rules: where the params go (None: the default device, default rules).
      seed: the random init's seed.
      with_audio: also return the audio encoder.
    Returns:
      (tokenizer, DecoderConfig, params), plus (ThinkerConfig, audio encoder params) or None as
      a 4th value when with_audio.
    """
    import flax.linen as nn

    from tarl_jax.models import audio as audio_model
    from tarl_jax.models import hf, omni, presets
    from tarl_jax.rl import checkpoint
    m = {**MODEL_DEFAULTS, **dict(mcfg)}
    rules = sharding.DEFAULT_RULES if rules is None else rules
    tok_dir = tokenizer_dir(m["tokenizer"], m["hf_dir"])
    tok = tokenizer_lib.ChatTokenizer(tok_dir)
    overrides = dict(dtype=m["dtype"], scan_layers=m["scan_layers"], remat=m["remat"],
                     attn_chunk=m["attn_chunk"], attn_sparse=m["attn_sparse"])
    audio_kind, frozen = m["audio"], not m["train_audio"]
    if audio_kind and tok.audio_id is None:
        raise ValueError(f"model.audio={audio_kind!r} needs a tokenizer with <|AUDIO|> (an Omni "
                         f"checkpoint's, or 'tiny'); {tok_dir} has none")
    thinker = None
    if audio_kind == "hf":
        tcfg = omni.ThinkerConfig.from_hf(
            json.loads((pathlib.Path(m["hf_dir"]) / "config.json").read_text()),
            text_overrides=overrides, freeze_audio=frozen)
        tcfg, both = omni.load_thinker(m["hf_dir"], tcfg, mesh=mesh, rules=rules)
        cfg, params, thinker = tcfg.text, both["model"], (tcfg, both["audio_tower"])
    elif m["orbax"]:   # a trained policy of the hf_dir's (or preset's) shape
        cfg = dataclasses.replace(model_shape(m["hf_dir"] or m["preset"]), **overrides)
        cfg, params = checkpoint.restore_policy(m["orbax"], cfg, m["step"], mesh, rules)
    elif m["hf_dir"]:
        cfg, params = hf.load_hf(m["hf_dir"], mesh=mesh, rules=rules, overrides=overrides)
    elif m["gguf"]:
        cfg, params = hf.load_gguf(m["gguf"], mesh=mesh, rules=rules, overrides=overrides)
    else:
        cfg = dataclasses.replace(model_shape(m["preset"]), **overrides)
        placed = {} if mesh is None else dict(out_shardings=sharding.logical_sharding(
            qwen.logical_axes(cfg), mesh, rules))
        params = jax.jit(lambda k: qwen.init_params(cfg, k), **placed)(jax.random.key(seed))
    # (An Omni checkpoint is held to its tokenizer by the audio token id below.)
    if audio_kind != "hf" and cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer {tok_dir} has {tok.vocab_size} ids > the model's vocab "
                         f"{cfg.vocab_size}: set the model's own tokenizer (model.tokenizer)")
    if audio_kind and thinker is None:
        tcfg = omni.ThinkerConfig(audio=presets.audio(audio_kind, cfg.hidden_size), text=cfg,
                                  audio_token_id=tok.audio_id, freeze_audio=frozen)
        thinker = (tcfg, nn.unbox(audio_model.boxed_params(tcfg.audio, jax.random.key(seed + 1))))
    if thinker is not None and thinker[0].audio_token_id != tok.audio_id:
        raise ValueError(f"the checkpoint's audio_token_id {thinker[0].audio_token_id} is not the "
                         f"tokenizer's <|AUDIO|> id {tok.audio_id}")
    return (tok, cfg, params, thinker) if with_audio else (tok, cfg, params)


# ---------------------------------------------------------------------------- the task world

@dataclasses.dataclass
class World:
    """What rollouts need: tool-use train/eval tasks, a way to make envs and users. RL batches
    come from the curriculum (rl/curriculum.py); `train` feeds the warm start."""
    db: Any                     # sandbox.db.World: the template database episodes fork
    train: list
    eval: list
    user_cfg: Any
    max_steps: int
    reward_variant: str
    system_prompt: str = ""     # replaces the domain policy as the agent's system prompt
    result_view: str = "full"   # how tool results read to the agent (synth.RESULT_VIEWS)

    def run_one(self, task, agent, max_steps: int | None = None):
        """One episode of `agent` on `task` (a math problem, or a dialogue in a fresh database)."""
        if task.domain == "math":
            return math_tasks.run_math_episode(task, agent)
        env = Env(self.db, task)
        if self.system_prompt:
            env.policy = self.system_prompt
        env.present = synth.RESULT_VIEWS[self.result_view]
        if task.extra.get("authenticated") and task.extra.get("lookups"):
            # A signed-in session tells the agent who the user is, as a store's would: the gold
            # path reads the user's record by id, which nothing else in the dialogue names
            # (level 1; level 0 reads nothing, and its shipped warm start has no such line).
            env.policy = f"{env.policy}\nThe signed-in user's id is {task.user_id}."
        return run_episode(env, task, agent, self.make_user(task), max_steps or self.max_steps,
                           self.reward_variant)

    def make_user(self, task):
        if self.user_cfg.kind == "offline":
            return OfflineUser(task, self.db)
        if self.user_cfg.kind == "llm":
            from tarl_jax.sandbox.user import LLMUser, LLMUserConfig
            return LLMUser(task.instruction, LLMUserConfig(
                model=self.user_cfg.model, base_url=self.user_cfg.base_url,
                api_key=os.environ.get(self.user_cfg.api_key_env, "EMPTY"),
                temperature=self.user_cfg.temperature))
        raise ValueError(f"user.kind={self.user_cfg.kind!r}: choose offline | llm")


def build_world(config) -> World:
    """The synthetic world (`synth.split`: the last `eval_tasks` held out, `val_tasks` before
    them for tuning, training disjoint from both; `eval_split` says which of test / validation
    the run evaluates on), or a tau-bench v1 / tau2 directory's database with its train / test
    split (eval: the first `eval_tasks`)."""
    w = config.world
    if w.source == "synthetic" and not w.data_dir:
        db, tasks = synth.make_world(synth.SynthConfig(**w.synth))
        parts = synth.split(tasks, w.eval_tasks, w.get("val_tasks", 0))
        split = w.get("eval_split", "test")
        if split not in ("test", "validation"):
            raise ValueError(f"world.eval_split={split!r}: choose test | validation")
        if not parts[split]:
            raise ValueError(f"world.eval_split={split!r} is empty: set world.val_tasks")
        train, eval_ = parts["train"], parts[split]
    else:
        from tarl_jax.sandbox import tasks as tasks_lib
        from tarl_jax.sandbox.db import World as DbWorld
        data = tasks_lib.find_data_dir(w.data_dir, w.domain)
        db = DbWorld.from_dir(w.domain, data.path)
        splits = data.load_splits()
        train, eval_ = splits["train"], splits["test"][:w.eval_tasks]
    view = w.get("result_view", "full")
    if view not in synth.RESULT_VIEWS:
        raise ValueError(f"world.result_view={view!r}: choose from {sorted(synth.RESULT_VIEWS)}")
    return World(db, train, eval_, config.user, w.max_steps, w.reward_variant, w.system_prompt,
                 view)


def tool_view(config):
    """How tool schemas are shown to the policy (world.tool_view: full | compact | minimal | none)."""
    if config.world.tool_view not in rollout.TOOL_VIEWS:
        raise ValueError(f"world.tool_view={config.world.tool_view!r}: choose from "
                         f"{sorted(rollout.TOOL_VIEWS)}")
    return rollout.TOOL_VIEWS[config.world.tool_view]


# ---------------------------------------------------------------------------- speech

def make_speech_view(config, thinker):
    """The speech front end (TTS + the audio encoder's embeddings) when the model hears audio;
    None for a text-only model."""
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
