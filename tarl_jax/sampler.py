"""Batched sampling over a static KV cache: prefill, `lax.while_loop` decode, multi-turn append.

State. `DecodeState(cache, length, hidden)` is a pytree the caller keeps between calls. The cache
holds keys/values at slot == absolute position (see `models/qwen.py`), so `length[b]` is both the
number of tokens row b holds and the position of its next token, and `hidden[b]` is the final
hidden state of row b's last token: its logits give the next token. Every token of a row is in the
cache, the last sampled one included: the decode loop writes each token in the step that samples
it (one extra 1-token forward per decode call compared with feeding the previous token). So the
next `append` (a tool result, a user turn) is exact and never re-encodes history. Prefill is
`append` on an empty cache: one code path. Both jitted functions donate the state: a state passed
in is consumed; keep the one returned.

Shapes (one compile per distinct tuple, shared by every Sampler of the same config). Batch size
and cache length are fixed by the state. An append feeds the rows' new tokens in calls that
advance them together (`prefill_plan`): a call takes the rows with tokens left (gathered into a
smaller state when their count, padded to a power of two, is below the batch) and a power-of-two
block of each, at least `prefill_block` and at most `prefill_chunk` wide (which bounds the
[B, H, T, S] attention scores); pads get `qwen.PAD_POSITION`, so their cache writes drop. One
padded [B, longest] block instead spent 70-80% of a rollout round's prefill on pads (level 1
compact: tool results of 100-170 tokens beside user turns of 20). The decode output buffers are
padded to the next power of two >= max(max_new_tokens, min_bucket); the loop stops as soon as
every row is done. With `decode_chunk` n > 0 a reply decodes n steps a call, and the rows still
writing are gathered the same way between calls: a decode step costs in proportion to its rows,
and in a rollout round most rows finish long before the longest reply. Only the last
position's hidden state is kept, so prefill never builds [B, T, V] logits.

Sampling, per row: temperature (0 = greedy argmax), top-k (0 = off), top-p (1 = off), stop token
set (the stop token is emitted and kept in the cache), max new tokens. Truncation is compiled in
only when some row uses it (it sorts the vocabulary each step).

Log-probs of the sampled tokens, flag `logprobs`:
  "tempered" (default): log_softmax(logits / T), T = 1 for greedy rows: the distribution the
      token was drawn from before top-k/top-p truncation. Trainers that divide the logits by the
      sampling temperature (verl, tunix) recompute exactly this, so the PPO ratio starts at 1.
  "raw": log_softmax(logits), the model's own distribution at temperature 1.
Truncation is never reflected in the log-probs: a trainer cannot reproduce it, and standard
PPO/GRPO setups ignore it.

Finish reasons: "stop" (a stop token was sampled), "length" (max_new_tokens reached),
"cache_full" (no slot left for the next token).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tarl_jax.models import bucket, omni, qwen

RUNNING, STOP, LENGTH, CACHE_FULL = 0, 1, 2, 3
REASONS = {STOP: "stop", LENGTH: "length", CACHE_FULL: "cache_full"}
LOGPROB_MODES = ("tempered", "raw")


class DecodeState(NamedTuple):
    cache: dict           # {"k": [L, B, Hkv, D, S], "v": [L, B, Hkv, S, D]} (qwen.init_cache)
    length: jax.Array     # [B] int32: tokens held == position of the next token
    hidden: jax.Array     # [B, D]: final hidden state of each row's last token


def init_state(cfg: qwen.DecoderConfig, batch: int, cache_len: int, cache_dtype=None) -> DecodeState:
    return DecodeState(qwen.init_cache(cfg, batch, cache_len, cache_dtype),
                       jnp.zeros((batch,), jnp.int32),
                       jnp.zeros((batch, cfg.hidden_size), jnp.dtype(cfg.dtype)))


def append(model: qwen.Decoder, params, state: DecodeState, tokens, num_new, audio=None,
           audio_token_id: int = -1) -> DecodeState:
    """Write tokens[b, :num_new[b]] at positions length[b], length[b] + 1, ... of row b.

    Rows with num_new == 0 are untouched. The caller guarantees the tokens fit in the cache.
    `audio` [B, A, D]: embeddings that replace row b's `audio_token_id` placeholders, in order.
    """
    idx = jnp.arange(tokens.shape[1])[None]
    positions = jnp.where(idx < num_new[:, None], state.length[:, None] + idx, qwen.PAD_POSITION)
    embeds = None
    if audio is not None:
        embeds = omni.merge_audio_rows(
            model.apply({"params": params}, tokens, method=qwen.Decoder.embed), tokens, audio,
            audio_token_id)
    hidden, cache = model.apply({"params": params}, tokens, positions, cache=state.cache,
                                embeds=embeds)
    last = jnp.take_along_axis(hidden, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]
    hidden = jnp.where((num_new > 0)[:, None], last, state.hidden)
    return DecodeState(cache, state.length + num_new, hidden)


def _gather(state: DecodeState, rows) -> DecodeState:
    # (The cache's batch is its axis 1.) Entries of rows equal to the batch size are padding:
    # copies of the last row.
    return DecodeState(jax.tree.map(lambda x: jnp.take(x, rows, axis=1, mode="clip"), state.cache),
                       jnp.take(state.length, rows, mode="clip"),
                       jnp.take(state.hidden, rows, axis=0, mode="clip"))


def _scatter(state: DecodeState, rows, sub: DecodeState) -> DecodeState:
    # Padding entries (== batch size) drop.
    return DecodeState(jax.tree.map(lambda x, y: x.at[:, rows].set(y, mode="drop"), state.cache,
                                    sub.cache),
                       state.length.at[rows].set(sub.length, mode="drop"),
                       state.hidden.at[rows].set(sub.hidden, mode="drop"))


def _row_index(rows: np.ndarray, batch: int) -> np.ndarray | None:
    """The state rows a call gathers (`_gather`): `rows` in a bucketed number of slots, padding
    slots naming row `batch` (gathered as a copy of the last row, never written back); None when
    that would not be smaller than the batch (every row then rides along)."""
    size = bucket(rows.size, 1)
    if size >= batch:
        return None
    index = np.full(size, batch, np.int32)
    index[:rows.size] = rows
    return index


def append_rows(model: qwen.Decoder, params, state: DecodeState, rows, tokens, num_new,
                audio=None, audio_token_id: int = -1) -> DecodeState:
    """`append` to rows[i] of the state only (tokens and num_new are per entry of rows): those
    rows are gathered into a smaller state, appended to, and written back. Entries of rows equal
    to the batch size are padding (num_new 0; their write-back drops)."""
    sub = append(model, params, _gather(state, rows), tokens, num_new, audio, audio_token_id)
    return _scatter(state, rows, sub)


def prefill_plan(num: Sequence[int], block: int,
                 max_width: int) -> list[tuple[int, int, np.ndarray]]:
    """The calls that append num[b] tokens to each row b: (offset, width, rows), each call
    feeding tokens [offset, offset + width) of the rows that have any there. Rows advance
    together, so padding stays small when their lengths differ (a tool result of 170 tokens
    beside user turns of 20): a call is `block` wide unless every row in it has at least twice
    that left (then the widest power-of-two multiple they all fill, up to max_width); a row
    alone takes its whole rest in one call."""
    num = np.asarray(num)
    calls, offset = [], 0
    while True:
        rows = np.nonzero(num > offset)[0]
        if rows.size == 0:
            return calls
        left = num[rows] - offset
        if rows.size == 1:
            width = bucket(int(left[0]), block)
        else:
            width = max(block, 1 << (int(left.min()).bit_length() - 1))
        width = min(width, max_width)
        calls.append((offset, width, rows))
        offset += width


def argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum; int32) as a max and a min:
    XLA:CPU lowers argmax to a (value, index) reduction it does not vectorise, 4-6x slower on
    [B, V] logits; decode of the tiny model ran 1.2-1.5x faster without it (same tokens). A row
    holding NaN gives the last index, where argmax names the NaN's."""
    top = jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, ids, x.shape[-1] - 1), axis=-1)


def sample_logits(logits, keys, temperature, top_p, top_k, truncate: bool, draw: bool = True):
    """One token per row from logits [B, V]; keys [B]; temperature, top_p [B] float; top_k [B] int.

    Gumbel-max on logits / T restricted to the top-k / top-p set; argmax where T == 0. draw=False
    (static; every row greedy): argmax only, without drawing B x V Gumbel noise the rows ignore.
    """
    if not draw:
        return argmax(logits)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    if truncate:
        ranked = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        rank = jnp.arange(logits.shape[-1])[None]
        # Both conditions keep a prefix of the ranking; the best token always survives. Tokens
        # tied with the last kept one are kept too.
        keep = (mass_before < top_p[:, None]) & ((top_k[:, None] <= 0) | (rank < top_k[:, None]))
        keep = keep.at[:, 0].set(True)
        cutoff = jnp.take_along_axis(ranked, keep.sum(-1, keepdims=True) - 1, axis=-1)
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:]))(keys)
    drawn = argmax(scaled + gumbel)
    return jnp.where(greedy, argmax(logits), drawn).astype(jnp.int32)


def token_logprobs(logits, tokens, temperature):
    """log p(token) under log_softmax(logits / temperature), per row."""
    logp = jax.nn.log_softmax(logits / temperature[:, None], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def decode(model: qwen.Decoder, params, state: DecodeState, rng, temperature, top_p, top_k,
           stop_tokens, max_new, logprob_temperature, banned=-1, allow=None, first_step=0, *,
           steps: int, truncate: bool, top_logprobs: int = 0, draw: bool = True):
    """Sample until every row stops; returns (state, tokens [B, steps] (-1 past the end),
    logprobs [B, steps], counts [B], reasons [B]). stop_tokens: [B, K] int, padded with -1;
    logprobs are taken under log_softmax(logits / logprob_temperature). `banned` (a token id,
    -1 none) is never sampled, nor is a token whose bit is 0 in `allow` ([B, ceil(V / 32)]
    int32 words, e.g. a grammar's mask: constrain.py); like truncation, neither is reflected
    in the log-probs. Step t of row b samples with fold_in(its key, first_step[b] + t).
    top_logprobs k > 0: also the k likeliest tokens of each step and their log-probs (the same
    distribution), [B, steps, k] each, as a sixth and seventh output. draw=False: every row is
    greedy (see sample_logits)."""
    batch, cache_len = state.length.shape[0], qwen.cache_length(state.cache)
    # One key per row when given (a row's samples then do not depend on the batch it is in).
    row_keys = rng if rng.ndim == 1 else jax.random.split(rng, batch)
    reason = jnp.where(max_new <= 0, LENGTH,
                       jnp.where(state.length >= cache_len, CACHE_FULL, RUNNING)).astype(jnp.int32)
    carry = (jnp.int32(0), state, reason, jnp.zeros((batch,), jnp.int32),
             jnp.full((batch, steps), -1, jnp.int32), jnp.zeros((batch, steps), jnp.float32),
             jnp.zeros((batch, steps, top_logprobs), jnp.int32),
             jnp.zeros((batch, steps, top_logprobs), jnp.float32))

    def cond(carry):
        step, _, reason, *_ = carry
        return (step < steps) & jnp.any(reason == RUNNING)

    def body(carry):
        step, st, reason, count, out_tok, out_lp, top_ids, top_lp = carry
        active = reason == RUNNING
        logits = model.apply({"params": params}, st.hidden, method=qwen.Decoder.logits)
        keys = jax.vmap(jax.random.fold_in)(row_keys, first_step + step)
        ids = jnp.arange(logits.shape[-1])
        allowed = jnp.where(ids == banned, -jnp.inf, logits)
        if allow is not None:
            bits = (allow[:, ids // 32] >> (ids % 32)) & 1
            allowed = jnp.where(bits == 1, allowed, -jnp.inf)
        tok = sample_logits(allowed, keys, temperature, top_p, top_k, truncate, draw)
        lp = token_logprobs(logits, tok, logprob_temperature)
        if top_logprobs:
            values, ids_k = jax.lax.top_k(
                jax.nn.log_softmax(logits / logprob_temperature[:, None], axis=-1), top_logprobs)
            top_ids = top_ids.at[:, step].set(ids_k.astype(jnp.int32))
            top_lp = top_lp.at[:, step].set(values)
        st = append(model, params, st, tok[:, None], active.astype(jnp.int32))
        out_tok = out_tok.at[:, step].set(jnp.where(active, tok, -1))
        out_lp = out_lp.at[:, step].set(jnp.where(active, lp, 0.0))
        count = count + active
        stopped = jnp.any(tok[:, None] == stop_tokens, axis=-1)
        reason = jnp.select([~active, stopped, count >= max_new, st.length >= cache_len],
                            [reason, STOP, LENGTH, CACHE_FULL], RUNNING).astype(jnp.int32)
        return step + 1, st, reason, count, out_tok, out_lp, top_ids, top_lp

    _, state, reason, count, out_tok, out_lp, top_ids, top_lp = jax.lax.while_loop(cond, body,
                                                                                    carry)
    if top_logprobs:
        return state, out_tok, out_lp, count, reason, top_ids, top_lp
    return state, out_tok, out_lp, count, reason



def decode_rows(model: qwen.Decoder, params, state: DecodeState, rows, *args, **kwargs):
    """`decode` of rows[i] of the state only, like `append_rows` (per-row arguments are per
    entry of rows; padding entries, == the batch size, need max_new 0)."""
    sub, *out = decode(model, params, _gather(state, rows), *args, **kwargs)
    return (_scatter(state, rows, sub), *out)

# Module-level, keyed on the (hashable) Decoder: every Sampler of one config shares the compiles,
# so a sampler made per episode costs no recompilation.
_init_state_jit = jax.jit(init_state, static_argnums=(0, 1, 2, 3))
_append_jit = jax.jit(append, static_argnums=0, donate_argnums=2,
                      static_argnames=("audio_token_id",))
_append_rows_jit = jax.jit(append_rows, static_argnums=0, donate_argnums=2,
                           static_argnames=("audio_token_id",))
_decode_jit = jax.jit(decode, static_argnums=0, donate_argnums=2,
                      static_argnames=("steps", "truncate", "top_logprobs", "draw"))
_decode_rows_jit = jax.jit(decode_rows, static_argnums=0, donate_argnums=2,
                           static_argnames=("steps", "truncate", "top_logprobs", "draw"))


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "cache_full"
    top: list[list[tuple[int, float]]] | None = None   # per token: the top_logprobs likeliest


def _per_row(value, batch: int, dtype, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        return np.full((batch,), arr, dtype)
    if arr.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or {batch} values, got shape {arr.shape}")
    return arr


def _stop_array(stop_tokens, batch: int) -> np.ndarray:
    """Shared ids [int, ...] or per-row sets [[int, ...], ...] -> [B, K] padded with -1."""
    rows = list(stop_tokens)
    if not rows or all(isinstance(t, (int, np.integer)) for t in rows):
        rows = [rows] * batch
    if len(rows) != batch:
        raise ValueError(f"stop_tokens: expected one id list shared or {batch} lists, got {len(rows)}")
    width = bucket(max(len(r) for r in rows), 4)
    out = np.full((batch, width), -1, np.int32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


class Sampler:
    """Model config + params + compiled prefill/append/decode, for rollouts and serving.

        sampler = Sampler(cfg, params, cache_len=4096)
        outs = sampler.generate(prompts, max_new_tokens=256, temperature=0.7, top_p=0.95,
                                stop_tokens=[im_end, endoftext], seed=0)
        # episode: the state keeps the whole dialogue; turns are appended, never re-encoded.
        state = sampler.start(prompts)
        state, outs = sampler.decode(state, max_new_tokens=256, ...)
        state = sampler.append(state, tool_result_tokens_per_row)   # [] for rows with nothing new
        state, outs = sampler.decode(state, ...)
    """

    def __init__(self, cfg: qwen.DecoderConfig, params, *, cache_len: int = 4096, cache_dtype=None,
                 logprobs: str = "tempered", prefill_chunk: int = 1024, prefill_block: int = 32,
                 min_bucket: int = 16, decode_chunk: int = 0,
                 audio_token_id: int | None = None, min_kv_window: int = 512, mesh=None,
                 rules=None):
        if logprobs not in LOGPROB_MODES:
            raise ValueError(f"logprobs={logprobs!r}: choose one of {LOGPROB_MODES}")
        self.cfg, self.params, self.cache_len, self.cache_dtype = cfg, params, cache_len, cache_dtype
        # mesh: the devices the cache lives on, cut by `rules` (batch over data/fsdp, KV heads
        # over tensor); the params are placed by the caller (`place`). None: the default device.
        self.mesh, self.rules = mesh, rules
        for name, n in (("prefill_chunk", prefill_chunk), ("prefill_block", prefill_block)):
            if n < 1 or n & (n - 1):
                raise ValueError(f"{name}={n}: a power of two")
        self.logprobs, self.prefill_chunk, self.min_bucket = logprobs, prefill_chunk, min_bucket
        self.prefill_block = min(prefill_block, prefill_chunk)
        if decode_chunk < 0:
            raise ValueError(f"decode_chunk={decode_chunk}: 0 (one call) or a step count")
        self.decode_chunk = decode_chunk
        self.audio_token_id = audio_token_id   # the Omni thinker's <|AUDIO|>; None: text only
        self.model = qwen.Decoder(cfg)
        self.min_kv_window = min_kv_window

    def shardings(self):
        """(params', cache state's) shardings on the sampler's mesh; None without one."""
        if self.mesh is None:
            return None
        from tarl_jax import sharding
        rules = sharding.DEFAULT_RULES if self.rules is None else self.rules
        row = sharding.spec(self.mesh, "batch", rules=rules)
        cache = {kv: sharding.spec(self.mesh, *axes, rules=rules)
                 for kv, axes in qwen.CACHE_AXES.items()}
        if not self.cfg.scan_layers:   # one array per layer (qwen.init_cache)
            cache = {kv: (spec,) * self.cfg.num_layers for kv, spec in cache.items()}
        state = DecodeState(cache,
                            row, sharding.spec(self.mesh, "batch", "embed", rules=rules))
        params = sharding.logical_sharding(qwen.logical_axes(self.cfg), self.mesh, rules)
        return params, state

    def place(self, params) -> None:
        """Act with `params` from now on, moved onto the sampler's mesh (if any)."""
        sh = self.shardings()
        self.params = params if sh is None else jax.device_put(params, sh[0])

    @functools.cached_property
    def _make_state(self):
        # One jitted maker per sampler: its mesh and rules are fixed, so its shardings are too.
        sh = self.shardings()
        return _init_state_jit if sh is None else jax.jit(
            init_state, static_argnums=(0, 1, 2, 3), out_shardings=sh[1])

    def empty_state(self, batch: int) -> DecodeState:
        """`batch` empty rows of cache, made where they live on the sampler's mesh (not on one
        device first), in one compiled call (eager zeros: 0.2 ms of host time, 7x more)."""
        return self._make_state(self.cfg, batch, self.cache_len, self.cache_dtype)

    def _model(self, end: int) -> qwen.Decoder:
        """The decoder for a call whose rows all end before position `end`: it attends to the
        smallest power-of-two window (>= min_kv_window) of cache slots that holds them, not
        the whole cache (early turns of a long-cache dialogue cost what a short cache would)."""
        w = bucket(end, self.min_kv_window)
        return self.model if w >= self.cache_len else qwen.Decoder(self.cfg, kv_window=w)

    def start(self, prompts: Sequence[Sequence[int]], audio=None) -> DecodeState:
        """A fresh state holding one prompt per row (every prompt needs >= 1 token)."""
        empty = [b for b, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"prompts: rows {empty} are empty; every row needs at least one token")
        too_long = [(b, len(p)) for b, p in enumerate(prompts) if len(p) > self.cache_len]
        if too_long:
            raise ValueError(f"prompts: (row, length) {too_long} exceed cache_len={self.cache_len}")
        return self.append(self.empty_state(len(prompts)), prompts, audio)

    def append(self, state: DecodeState, new_tokens: Sequence[Sequence[int]],
               audio=None) -> DecodeState:
        """Append new_tokens[b] (possibly empty) to row b; consumes `state`.

        audio: None, or per row None / [n_b, D] embeddings (e.g. `omni.AudioEmbeddingCache`
        output, utterances concatenated) for the n_b `<|AUDIO|>` placeholders of new_tokens[b]:
        the speech turns of an Omni thinker's decoder. Needs `audio_token_id`."""
        batch = state.length.shape[0]
        if len(new_tokens) != batch:
            raise ValueError(f"new_tokens: {len(new_tokens)} rows for a state of batch {batch}")
        lengths = np.asarray(state.length)
        num = np.array([len(t) for t in new_tokens], np.int32)
        over = np.nonzero(lengths + num > self.cache_len)[0]
        if over.size:
            raise ValueError(
                f"new_tokens: rows {over.tolist()} would hold {(lengths + num)[over].tolist()} tokens "
                f"> cache_len={self.cache_len}")
        is_audio = self._audio_positions(new_tokens, audio)
        for offset, width, rows in prefill_plan(num, self.prefill_block, self.prefill_chunk):
            # The call's rows: gathered into the first slots of a smaller state, unless that
            # would not be smaller (then every row rides along, those without tokens unchanged).
            index = _row_index(rows, batch)
            whole = index is None
            size = batch if whole else index.size
            slot = rows if whole else np.arange(rows.size)
            chunk = np.zeros(size, np.int32)
            chunk[slot] = np.clip(num[rows] - offset, 0, width)
            tokens = np.zeros((size, width), np.int32)
            for i, b in zip(slot, rows):
                tokens[i, :chunk[i]] = new_tokens[b][offset:offset + chunk[i]]
            audio_rows = None
            if is_audio is not None:
                # Each row's embeddings for the placeholders inside this call, in order.
                streams = [None] * size
                for i, b in zip(slot, rows):
                    done = int(is_audio[b][:offset].sum())
                    here = int(is_audio[b][offset:offset + width].sum())
                    if here:
                        streams[i] = audio[b][done:done + here]
                if any(x is not None for x in streams):
                    audio_rows = omni.audio_rows(streams, self.cfg.hidden_size, self.min_bucket)
            model = self._model(int((lengths[rows] + offset + chunk[slot]).max()))
            audio_id = -1 if audio_rows is None else self.audio_token_id
            if whole:
                state = _append_jit(model, self.params, state, tokens, chunk, audio_rows,
                                    audio_token_id=audio_id)
            else:
                state = _append_rows_jit(model, self.params, state, index, tokens, chunk,
                                         audio_rows, audio_token_id=audio_id)
        return state

    def _audio_positions(self, new_tokens, audio) -> list[np.ndarray] | None:
        """Per-row placeholder masks, after checking each row's embeddings match them."""
        if self.audio_token_id is None:
            if audio is not None:
                raise ValueError("audio given to a Sampler made without audio_token_id")
            return None
        masks = [np.asarray(t, np.int64) == self.audio_token_id for t in new_tokens]
        if audio is None:
            audio = [None] * len(new_tokens)
        if len(audio) != len(new_tokens):
            raise ValueError(f"audio: {len(audio)} rows for {len(new_tokens)} token rows")
        for b, (m, a) in enumerate(zip(masks, audio)):
            have = 0 if a is None else len(a)
            if int(m.sum()) != have:
                raise ValueError(f"row {b}: {int(m.sum())} <|AUDIO|> placeholders but {have} audio "
                                 "embeddings")
            if a is not None and np.shape(a)[-1] != self.cfg.hidden_size:
                raise ValueError(f"row {b}: audio embeddings of width {np.shape(a)[-1]}, the "
                                 f"decoder's is {self.cfg.hidden_size}")
        return masks if any(m.any() for m in masks) else None

    def decode(self, state: DecodeState, *, max_new_tokens=256, temperature=1.0, top_p=1.0,
               top_k=0, stop_tokens: Sequence = (), seed=0, allow=None, first_step=0,
               top_logprobs: int = 0) -> tuple[DecodeState, list[Completion]]:
        """Sample a continuation per row; per-row values may be scalars or one value per row.

        `seed`: an int, a jax PRNG key (e.g. fold_in(rng, step)), or one key per row ([B] keys:
        each row's samples are then independent of the batch it is in); same seed, same samples.
        allow: None or [B, ceil(vocab / 32)] int32 bitmasks of the tokens each row may sample
        (the module's `decode`). first_step: where each row's step counter starts, so a
        continuation decoded in several calls samples what one call would (the sampler's
        `decode_chunk` relies on it). top_logprobs k: each Completion's `top` holds every
        step's k likeliest (token, log-prob).
        Consumes `state`; the returned one holds every sampled token.
        """
        batch = state.length.shape[0]
        temperature = _per_row(temperature, batch, np.float32, "temperature")
        top_p = _per_row(top_p, batch, np.float32, "top_p")
        top_k = _per_row(top_k, batch, np.int32, "top_k")
        max_new = _per_row(max_new_tokens, batch, np.int32, "max_new_tokens")
        first_step = _per_row(first_step, batch, np.int32, "first_step")
        stops = _stop_array(stop_tokens, batch)
        allow = None if allow is None else np.asarray(allow, np.int32)
        rng = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        # One key per row, as `decode` splits them: the same samples however the rows are cut.
        row_keys = rng if rng.ndim == 1 else jax.random.split(rng, batch)
        sampled = temperature > 0
        # Fixed for the whole batch (a chunk's rows do not change the program's variant).
        static = dict(truncate=bool(np.any(sampled & ((top_p < 1) | (top_k > 0)))),
                      top_logprobs=top_logprobs, draw=bool(np.any(sampled)))
        logprob_temperature = np.where(sampled & (self.logprobs == "tempered"), temperature,
                                       1.0).astype(np.float32)
        # An <|AUDIO|> the policy wrote would be taken for a placeholder of heard audio.
        banned = -1 if self.audio_token_id is None else self.audio_token_id
        chunk = self.decode_chunk or np.iinfo(np.int32).max
        left = max_new.copy()
        outs = [Completion([], [], "length", [] if top_logprobs else None) for _ in range(batch)]
        running = np.arange(batch) if not self.decode_chunk else np.nonzero(left > 0)[0]
        while running.size:
            # The running rows, gathered into a smaller state when that is smaller (as in
            # `append`); the rest ride along with max_new 0, unchanged.
            index = _row_index(running, batch) if self.decode_chunk else None
            whole = index is None
            if whole:
                index = np.arange(batch)
            live = np.zeros(batch + 1, bool)
            live[running] = True
            row = np.minimum(index, batch - 1)
            new = np.where(live[index], np.minimum(left[row], chunk), 0).astype(np.int32)
            steps = bucket(min(int(new.max()), self.cache_len), self.min_bucket)
            lengths = np.asarray(state.length)
            model = self._model(int(lengths[running].max()) + steps)
            args = (row_keys if whole else row_keys[row], temperature[row], top_p[row],
                    top_k[row], stops[row], new, logprob_temperature[row], banned,
                    None if allow is None else allow[row], first_step[row] + (max_new - left)[row])
            if whole:
                state, *out = _decode_jit(model, self.params, state, *args, steps=steps, **static)
            else:
                state, *out = _decode_rows_jit(model, self.params, state, index, *args,
                                               steps=steps, **static)
            tokens, logprobs, counts, reasons, *top = jax.device_get(out)
            more = []
            for i, b in enumerate(index):
                if b == batch or not live[b]:
                    continue
                n, c = int(counts[i]), outs[b]
                c.tokens += tokens[i, :n].tolist()
                c.logprobs += logprobs[i, :n].tolist()
                if top_logprobs:
                    c.top += [list(zip(top[0][i, t].tolist(), top[1][i, t].tolist()))
                              for t in range(n)]
                left[b] -= n
                c.finish_reason = REASONS[int(reasons[i])]
                if c.finish_reason == "length" and left[b] > 0:   # the chunk ended, not the reply
                    more.append(b)
            running = np.array(more, np.int64)
        return state, outs

    def generate(self, prompts: Sequence[Sequence[int]], **decode_kwargs) -> list[Completion]:
        _, completions = self.decode(self.start(prompts), **decode_kwargs)
        return completions
