"""Rollouts: many sandbox episodes driven by one batched, multi-turn KV-cache sampler.

Each episode runs the ordinary `run_episode` loop in its own thread, with a `PolicyAgent` for
its slot (row) of the sampler. Agents do not call the model themselves: they hand their new
prompt tokens to the `LockstepEngine` and block. When every live episode is waiting (users and
tools answer in microseconds offline), the engine makes one batched call: append each row's new
tokens to the shared cache, decode, and hand each row its completion. A round therefore holds
exactly the live episodes, which makes rollouts deterministic for a seed.

Token accounting: a row's cache holds exactly the stream the agent records, prompt_ids (system
prompt with tools, then each rendered user/tool turn) followed by token_ids (what it sampled),
so the learner trains on the very ids the policy saw and produced.

Speech mode (`speech=SpeechView`): user turns reach the policy as audio placeholders; each turn
records the utterances it heard (`AgentTurn.audio`) and the engine prefills their embeddings.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from tarl_jax import engine as engine_lib
from tarl_jax.models.tokenizer import ChatTokenizer
from tarl_jax.sampler import Sampler
from tarl_jax.sandbox.episode import AgentReply
from tarl_jax.sandbox.record import Episode


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_turn_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    enable_thinking: bool = False


class ContextFull(RuntimeError):
    """The episode's dialogue no longer fits in the sampler's cache."""


def compact_tools(tools: list[dict]) -> list[dict]:
    """Tool schemas without descriptions: names, argument names, types, required. Small models
    with short contexts see the interface without ~2/3 of the prompt tokens."""
    out = []
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {}
        props = {k: {"type": v.get("type", "string")} for k, v in params.get("properties", {}).items()}
        out.append({"type": "function", "function": {
            "name": fn["name"],
            "parameters": {"type": "object", "properties": props,
                           "required": params.get("required", [])}}})
    return out


def minimal_tools(tools: list[dict]) -> list[dict]:
    """One line per tool, `{"name": ..., "arguments": [...]}`: the interface in ~15 tokens a
    tool, for tiny models whose whole context is a couple of thousand tokens."""
    return [{"name": t["function"]["name"],
             "arguments": list((t["function"].get("parameters") or {}).get("properties", {}))}
            for t in tools]


# "none": no schemas in the prompt; the policy knows its tools from the system prompt's brief and
# its demonstrations. The tools still exist and calls are validated; only the prompt is shorter.
# That is what lets a tiny model learn to copy ids: attention starts spread evenly over the
# context, so the gradient towards the one position to copy from scales as 1/context. Measured
# on the level-0 world (tiny model, SFT lr 1e-3): first prompt 517 tokens with `minimal`, no copy
# after 300 steps; 75 tokens with `none`, copy formed between steps 350 and 400.
TOOL_VIEWS = {"full": lambda tools: tools, "compact": compact_tools, "minimal": minimal_tools,
              "none": lambda tools: []}


class LockstepEngine:
    """Rounds over `engine.Rows` (see engine.py): episodes in threads hand over their turns
    (`generate`, blocking) and leave (`finish`); `serve` runs the rounds in the caller's thread."""

    def __init__(self, sampler: Sampler, tokenizer: ChatTokenizer, slots: int, cfg: DecodeConfig,
                 rng: jax.Array, episode_ids: Sequence[int] | None = None, speech=None):
        self.sampler, self.tok, self.cfg, self.speech = sampler, tokenizer, cfg, speech
        self.slots = slots
        # Row b's key in round r is fold_in(fold_in(rng, episode id), r): an episode samples the
        # same tokens whichever batch, host or slot it runs in.
        ids = jax.numpy.arange(slots) if episode_ids is None else jax.numpy.asarray(episode_ids)
        self.episode_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, ids)
        self.pending: dict[int, tuple[list[int], list[str]]] = {}
        self.results: dict[int, Any] = {}
        self.live = set(range(slots))
        self.cond = threading.Condition()
        self.rounds = 0
        self.generated_tokens = 0
        # Seconds of the rounds: prefill, decode, and waiting for the episodes' host work
        # (sandbox tools, the user simulator, rendering and parsing turns).
        self.seconds = {"prefill_s": 0.0, "decode_s": 0.0, "host_s": 0.0}
        self.error: Exception | None = None   # a failed batched call fails every waiting episode

    # Called from episode threads.
    def generate(self, slot: int, new_ids: list[int], audio: Sequence[str] = ()):
        """audio: refs of the utterances whose placeholders are in new_ids, in order."""
        with self.cond:
            self.pending[slot] = (new_ids, list(audio))
            self.cond.notify_all()
            while slot not in self.results and self.error is None:
                self.cond.wait()
            out = self.results.pop(slot, self.error)
        if isinstance(out, Exception):
            raise out
        return out

    def finish(self, slot: int):
        with self.cond:
            self.live.discard(slot)
            self.cond.notify_all()

    def serve(self):
        """Runs in the caller's thread until every episode has finished."""
        try:
            self._serve()
        except Exception as e:
            with self.cond:
                self.error = RuntimeError(f"batched sampling failed: {type(e).__name__}: {e}")
                self.cond.notify_all()
            raise

    def _serve(self):
        rows = engine_lib.Rows(self.sampler, self.slots, empty=False)
        cache_len = self.sampler.cache_len
        while True:
            t0 = time.perf_counter()
            with self.cond:
                while self.live and not set(self.live) <= set(self.pending):
                    self.cond.wait()
                if not self.live:
                    return
                requests, self.pending = dict(self.pending), {}
            t1 = time.perf_counter()
            self.seconds["host_s"] += t1 - t0
            new = [[] for _ in range(self.slots)]
            refs: list[list[str]] = [[] for _ in range(self.slots)]
            max_new = [0] * self.slots
            errors = {}
            lengths = rows.lengths()
            for slot, (ids, heard) in requests.items():
                room = cache_len - lengths[slot] - len(ids)
                if room < 2:  # need the prompt plus at least one sampled token and its slot
                    errors[slot] = ContextFull(
                        f"slot {slot}: {lengths[slot]} + {len(ids)} tokens leave no room in "
                        f"cache_len={cache_len}")
                    continue
                new[slot], max_new[slot] = ids, min(self.cfg.max_turn_tokens, room - 1)
                refs[slot] = heard
            # One encoder call for every utterance of the round (cached ones are free).
            audio = [self.speech.stream(r) for r in refs] if any(refs) else None
            rows.prefill(new, audio, pad=self.tok.pad_id)
            jax.block_until_ready(rows.state)   # decode waits for it anyway: only the clock sees it
            t2 = time.perf_counter()
            outs = rows.decode(
                engine_lib.row_keys(self.episode_keys, np.full(self.slots, self.rounds, np.uint32)),
                max_new_tokens=max_new, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                top_k=self.cfg.top_k, stop_tokens=self.tok.stop_ids)
            self.seconds["prefill_s"] += t2 - t1
            self.seconds["decode_s"] += time.perf_counter() - t2
            self.rounds += 1
            with self.cond:
                for slot in requests:
                    self.results[slot] = errors.get(slot) or outs[slot]
                    if slot not in errors:
                        self.generated_tokens += len(outs[slot].tokens)
                self.cond.notify_all()


class _Stream:
    """The ids a policy is fed: the first prompt in full, then only what each turn adds."""

    def __init__(self, tok: ChatTokenizer, tool_view: Callable, enable_thinking: bool,
                 speech=None, user_id: str = ""):
        self.tok, self.tool_view, self.enable_thinking = tok, tool_view, enable_thinking
        self.speech, self.user_id = speech, user_id
        self.seen = 0            # messages already in the stream
        self.cut = False         # last turn hit the token limit: close it before appending

    def prompt(self, messages: list[dict], tools: list[dict]) -> tuple[list[int], list[str]]:
        """(ids to feed, refs of the utterances heard in them)."""
        new = [_escape_audio(m) for m in messages[self.seen:]]
        refs: list[str] = []
        if self.speech is not None:
            new, refs = self.speech.speak_messages(new, self.user_id)
        if self.seen == 0:
            ids = self.tok.render(new, self.tool_view(tools) if tools else None,
                                  add_generation_prompt=True,
                                  enable_thinking=self.enable_thinking).ids
        else:
            # The assistant message at `seen - 1` is our own reply, already in the stream.
            ids = self.tok.render_append(new, enable_thinking=self.enable_thinking,
                                         close_turn=self.cut)
        self.seen = len(messages) + 1
        return ids, refs


_AUDIO_MARKERS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")


def _escape_audio(message: dict) -> dict:
    """Text that spells an audio marker (a tool echoing a sampled argument, say) must not become
    a placeholder of audio nobody heard: `<|AUDIO|>` in text is fed as `< |AUDIO|>`."""
    content = message.get("content")
    if not isinstance(content, str) or "<|audio" not in content.lower():
        return message
    for marker in _AUDIO_MARKERS:
        content = content.replace(marker, "< " + marker[1:])
    return {**message, "content": content}


class PolicyAgent:
    """The agent callable of one episode (one sampler row)."""

    def __init__(self, engine: LockstepEngine, slot: int, tool_view: Callable = compact_tools,
                 user_id: str = ""):
        self.engine, self.slot = engine, slot
        self.stream = _Stream(engine.tok, tool_view, engine.cfg.enable_thinking, engine.speech,
                              user_id)

    def __call__(self, messages: list[dict], tools: list[dict]) -> AgentReply:
        tok = self.engine.tok
        prompt, heard = self.stream.prompt(messages, tools)
        completion = self.engine.generate(self.slot, prompt, heard)
        self.stream.cut = completion.finish_reason != "stop"
        parsed = tok.parse(completion.tokens, call_id_prefix=f"call_{len(messages)}")
        message = dict(parsed.message)
        if parsed.errors:
            # Recorded on the message so the episode runner can answer with an error observation.
            message["parse_errors"] = list(parsed.errors)
        return AgentReply(message=message, prompt_ids=prompt, token_ids=completion.tokens,
                          logprobs=completion.logprobs, audio=heard or None)


class TeacherAgent:
    """Wraps a scripted agent (e.g. the expert) and records the ids a policy would have been fed
    and would have generated for its messages: warm-start data in exactly the rollout format."""

    def __init__(self, agent: Callable, tok: ChatTokenizer, tool_view: Callable = compact_tools,
                 enable_thinking: bool = False, speech=None, user_id: str = ""):
        self.agent, self.tok = agent, tok
        self.stream = _Stream(tok, tool_view, enable_thinking, speech, user_id)

    def __call__(self, messages: list[dict], tools: list[dict]) -> AgentReply:
        reply = self.agent(messages, tools)
        message = reply.message if isinstance(reply, AgentReply) else reply
        prompt, heard = self.stream.prompt(messages, tools)
        return AgentReply(message=message, prompt_ids=prompt,
                          token_ids=self.tok.encode_reply(message), logprobs=None,
                          audio=heard or None)


def run_batch(tasks: Sequence, run_one: Callable[[Any, Callable], Episode], sampler: Sampler,
              tokenizer: ChatTokenizer, cfg: DecodeConfig, rng: jax.Array,
              tool_view: Callable = compact_tools,
              episode_ids: Sequence[int] | None = None, speech=None,
              max_rows: int = 0) -> tuple[list[Episode], dict]:
    """Episodes for `tasks` (in order) with one lockstep engine; `run_one(task, agent)` runs
    one episode (e.g. run_episode with its env and user). `episode_ids` (default 0..n-1) seed
    each episode's sampling. `speech`: a SpeechView, the users speak (mode "speech").
    max_rows > 0: at most that many episodes (cache rows) at once, in waves: the same episodes,
    since a row's samples never depend on the others (rollout.max_rows: what fits a chip).
    Returns (episodes, stats)."""
    episode_ids = list(range(len(tasks)) if episode_ids is None else episode_ids)
    if max_rows and len(tasks) > max_rows:
        episodes, stats = [], {"rounds": 0, "generated_tokens": 0, "prefill_s": 0.0,
                               "decode_s": 0.0, "host_s": 0.0}
        for i in range(0, len(tasks), max_rows):
            eps, st = run_batch(tasks[i:i + max_rows], run_one, sampler, tokenizer, cfg, rng,
                                tool_view, episode_ids[i:i + max_rows], speech)
            episodes += eps
            stats = {k: stats[k] + st[k] for k in stats}
        return episodes, stats
    engine = LockstepEngine(sampler, tokenizer, len(tasks), cfg, rng, episode_ids, speech)

    def one(slot_task):
        slot, task = slot_task
        try:
            ep = run_one(task, PolicyAgent(engine, slot, tool_view, getattr(task, "user_id", "")))
            if speech is not None:
                mark_speech(ep)
            return ep
        finally:
            engine.finish(slot)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        futures = pool.map(one, enumerate(tasks))
        engine.serve()
        episodes = list(futures)
    return episodes, {"rounds": engine.rounds, "generated_tokens": engine.generated_tokens,
                      **engine.seconds}


def mark_speech(ep: Episode) -> None:
    """Mode "speech", and each user EnvTurn's `audio` = the refs the agent heard for it (every
    user message is heard once, in order, by the turn that follows it)."""
    heard = ep.heard_audio
    users = [t for t in ep.turns if getattr(t, "kind", None) == "user"]
    # The last user message (e.g. ###STOP###) may never have been heard by an agent turn.
    for turn, ref in zip(users, heard):
        turn.audio = [ref]
    ep.mode = "speech"
