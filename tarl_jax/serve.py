"""OpenAI-compatible chat server for any checkpoint the project loads (policy, judge, user sim).

    python -m tarl_jax.serve --preset tiny | --hf DIR | --gguf FILE | --orbax WORKDIR [--arch tiny|DIR]
        [--tokenizer tiny|qwen3|DIR] [--host 127.0.0.1] [--port 8000] [--model-name NAME]
        [--batch 8] [--cache-len 4096] [--chunk 16] [--refill-wait-ms 10] [--max-tokens N]
        [--api-key KEY] [--max-body-mb 8] [--idle-timeout-s 30]

Endpoints: GET /v1/models, GET /v1/models/NAME, POST /v1/chat/completions (messages, tools,
tool_choice, parallel_tool_calls, response_format, temperature, top_p, max_tokens |
max_completion_tokens, seed, n, stop, logprobs, top_logprobs, stream with
stream_options.include_usage, chat_template_kwargs.enable_thinking), GET /health, GET /metrics
(Prometheus: requests, prompt and cached prompt tokens, generated tokens, tokens/s, queue
depth, busy rows). The prompt is
`ChatTokenizer.render(messages, tools, add_generation_prompt=True)`; the reply is
`ChatTokenizer.parse(generated ids)`: tool calls come back as OpenAI `tool_calls` (ids unique per
request), `<think>` as `reasoning_content`. Structured outputs are enforced token by token
(constrain.py, llguidance): response_format json_object / json_schema (strict or not), and
tool_choice "required" or a named function (calls whose arguments match the tool's parameters;
one call with parallel_tool_calls false), "none" (the call token banned); a constrained reply
gets no <think> block. `stop`: up to 4 strings; the reply's text ends before the first one
found (checked after each chunk; usage counts the tokens sampled). `logprobs`: each token's
log-prob under the model's own distribution (temperature 1, before top-p), `top_logprobs` <= 20
alternatives. `n` choices: choice k is what n=1 with seed + k returns; admitted together, they
copy choice 0's prefilled row instead of prefilling the prompt again (usage counts the prompt
once); streamed, each chunk names its choice (`index`).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}. GET /health answers
{"status": "ok"} (without the API key). Bodies are checked by pydantic models (chat_api.py); the
HTTP layer is a Starlette app on uvicorn
(`ChatServer`: its limits); the engine below it is a plain object the app calls.

Batching. One worker thread owns an `engine.Rows` of `batch` rows over the jitted Sampler. It
decodes all busy rows `chunk` tokens at a time; between chunks finished rows are freed and waiting
requests are prefilled into free rows (a row is recycled by setting its length back, to 0 or to
the prefix it keeps: a query at position p only attends to cache slots <= p, so stale entries
are invisible). While any row follows a grammar, the batch decodes a token a call, the host
filling each such row's mask between calls (bench.serve --structured: its cost). So a request never
waits for a whole batch to finish, and streaming sends a delta per chunk. Idle rows get
max_new_tokens=0 but still ride along in the batched matmuls, so after replies go out the worker
waits up to --refill-wait-ms for their clients' next requests before decoding on. A freed row
keeps its cache: a request goes to the row holding the longest prefix of its prompt (a harness
re-sends the conversation every turn) and only the rest is prefilled; `usage` reports it as
prompt_tokens_details.cached_tokens. A request without max_tokens gets --max-tokens (tau-bench
and tau2 set none; unset: the rest of the cache, as OpenAI does).

Seeds. Each row gets its own key, fold_in(key(seed mod 2**32), tokens generated so far), and a
request's chunk boundaries are always multiples of `chunk`: a seeded request samples the same
tokens whatever else is in the batch (up to float rounding across batch shapes). Without a seed,
a random one is drawn. finish_reason: "length" when max_tokens or the cache ended the reply,
else "tool_calls" when it holds calls, else "stop".

Weights and the KV cache live on the first device, or are cut by heads over --tensor of this
host's devices (same replies as one device). An orbax source is a trainer workdir: only
params["policy"] of the latest (or --step) checkpoint is read, with the architecture, tokenizer,
--tensor, --cache-len and --max-tokens of the run's own config.json (what the flags leave unset),
or --arch (a preset name or an HF config.json / its directory); scan_layers is read off the
checkpoint.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import json
import logging
import os
import pathlib
import queue
import socket
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np
import prometheus_client
import prometheus_client.core
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tarl_jax import chat_api, constrain
from tarl_jax.chat_api import ApiError
from tarl_jax import engine as engine_lib
from tarl_jax import sampler as sampler_lib
from tarl_jax import sharding
from tarl_jax.models import qwen
from tarl_jax.models import tokenizer as tokenizer_lib

log = logging.getLogger("tarl_jax.serve")



# ----------------------------------------------------------------------------- the batching engine

@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: bool = False   # set by the client's thread (disconnect): the worker frees the row
    cached: int = 0           # prompt tokens whose keys/values a previous request left in the row
    # Structured output (constrain.py): a grammar's matcher, advanced token by token, or a fixed
    # mask of the tokens the reply may use (tool_choice "none").
    matcher: Any = None
    allow: np.ndarray | None = None
    stop: tuple[str, ...] = ()      # stop strings: the reply ends before the first one
    stop_at: int | None = None      # where in the reply's text a stop string was found
    top_logprobs: int = 0           # > 0: the likeliest tokens of each step are kept
    logprobs: list[float] = dataclasses.field(default_factory=list)   # each token's (raw)
    top: list = dataclasses.field(default_factory=list)              # [(id, logprob)] a token
    leader: "Request | None" = None  # n > 1: choice 0, whose prefilled row this one copies



_seed_keys = jax.jit(jax.vmap(jax.random.key))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class Engine:
    """Continuous batching over `engine.Rows` (see engine.py), driven by one worker thread.

    `submit` returns a Request whose `events` queue receives ("tokens", [ids]) per chunk, then
    ("done", finish_reason) or ("error", message).
    """

    def __init__(self, sampler: sampler_lib.Sampler, stop_ids, batch: int = 8, chunk: int = 16,
                 refill_wait_s: float = 0.01, detokenize=None):
        self.sampler, self.stop_ids, self.batch, self.chunk = sampler, list(stop_ids), batch, chunk
        self.vocab_size, self.detokenize = sampler.cfg.vocab_size, detokenize
        self.busy = 0
        self.generated = 0                       # tokens, since start
        self.recent: collections.deque = collections.deque(maxlen=256)   # (time, tokens) a chunk
        self.refill_wait_s = refill_wait_s
        # Per row, the tokens whose keys/values sit in its cache slots 0.. (a freed row keeps
        # them until it is reused), and when it was last given a request.
        self.held: list[list[int]] = [[] for _ in range(batch)]
        self.last_used = [0] * batch
        self.admitted = 0
        self.waiting: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Request:
        self.waiting.put(request)
        return request

    def close(self):
        self.waiting.put(None)
        self.thread.join()
        while not self.waiting.empty():
            r = self.waiting.get()
            if r is not None:
                r.events.put(("error", "server shutting down"))

    def _run(self):
        rows: list[Request | None] = [None] * self.batch
        cache = engine_lib.Rows(self.sampler, self.batch)
        freed = False
        while True:
            new = {}
            free = [b for b, r in enumerate(rows) if r is None]
            # Block when there is nothing to decode. Right after replies went out, wait a moment
            # for their clients' next requests: a closed-loop client answers within
            # milliseconds, and a row left empty now stays empty for a whole chunk.
            deadline = time.monotonic() + (self.refill_wait_s if freed else 0.0)
            while free:
                idle = len(free) == self.batch and not new
                timeout = None if idle else deadline - time.monotonic()
                try:
                    r = self.waiting.get_nowait() if timeout is not None and timeout <= 0 else \
                        self.waiting.get(timeout=timeout)
                except queue.Empty:
                    break
                if r is None:
                    for r in filter(None, rows + list(new.values())):
                        r.events.put(("error", "server shutting down"))
                    return
                if not r.cancelled:
                    b = self._pick_row(free, r)
                    free.remove(b)
                    new[b] = r
            try:
                busy = self.busy = sum(r is not None for r in rows) + len(new)
                self._step(cache, rows, new)
                self.busy = sum(r is not None for r in rows)
                freed = self.busy < busy
            except Exception as e:  # noqa: BLE001 -- fail the batch, keep serving
                log.exception("engine step failed")
                for b, r in list(enumerate(rows)) + list(new.items()):
                    if r is not None:
                        r.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                    rows[b] = None
                cache = engine_lib.Rows(self.sampler, self.batch)
                self.held = [[] for _ in range(self.batch)]

    def _pick_row(self, free: list[int], request: Request) -> int:
        """A free row for the request; sets request.cached, the prompt prefix it already holds.

        A multi-turn client re-sends its whole conversation each turn (tau-bench: a 5k-token
        policy first), so a row whose tokens the prompt mostly continues (at least half of
        them: the same conversation, or one with the same long system prompt) is taken, the
        longest such prefix first, and only the new tail is prefilled. Otherwise the row
        holding the fewest tokens (then the least recently used) is: a new conversation evicts
        the least work. The last prompt token is always prefilled again: sampling starts from
        its hidden state."""
        cached = {b: min(common_prefix(self.held[b], request.prompt), len(request.prompt) - 1)
                  for b in free}
        going_on = [b for b in free if self.held[b] and 2 * cached[b] >= len(self.held[b])]
        b = max(going_on, key=cached.get) if going_on else \
            min(free, key=lambda b: (len(self.held[b]), self.last_used[b]))
        self.admitted += 1
        request.cached, self.last_used[b] = cached[b], self.admitted
        return b

    def _step(self, cache: engine_lib.Rows, rows, new):
        if new:
            # Each new request's row is cut back to the prefix it reuses, then takes the rest;
            # a later choice of a prompt admitted with its first copies that row once prefilled.
            row_of = {id(r): b for b, r in new.items()}
            copies = {b: row_of[id(r.leader)] for b, r in new.items()
                      if r.leader is not None and id(r.leader) in row_of}
            fresh = {b: r for b, r in new.items() if b not in copies}
            cache.prefill([fresh[b].prompt[fresh[b].cached:] if b in fresh else []
                           for b in range(self.batch)], keep={b: r.cached for b, r in fresh.items()})
            cache.copy(copies)
            for b, src in copies.items():
                new[b].cached = len(new[b].prompt)
            for b, r in new.items():
                rows[b] = r
        before = [0 if r is None else len(r.tokens) for r in rows]
        ended: list[str | None] = [None] * self.batch   # "stop" / "cache_full" this chunk
        # A grammar's next mask depends on the token just sampled: then the chunk goes one token
        # a call, every row alike (what a row samples does not depend on how its reply is cut
        # into calls: _decode).
        grammar = any(r is not None and r.matcher is not None for r in rows)
        for _ in range(self.chunk if grammar else 1):
            going = [r is not None and ended[b] is None and len(r.tokens) < r.max_tokens
                     for b, r in enumerate(rows)]
            if not any(going):
                break
            outs = self._decode(cache, rows, going, 1 if grammar else self.chunk)
            for b, (r, out) in enumerate(zip(rows, outs)):
                if going[b]:
                    r.tokens += out.tokens
                    r.logprobs += out.logprobs
                    if r.top_logprobs:
                        r.top += [t[:r.top_logprobs] for t in out.top]
                    if r.matcher is not None:
                        r.matcher.consume_tokens(out.tokens)
                    if out.finish_reason != "length":
                        ended[b] = out.finish_reason
        lengths = cache.lengths()
        made = sum(len(r.tokens) - n for r, n in zip(rows, before) if r is not None)
        self.generated += made
        self.recent.append((time.monotonic(), made))
        for b, r in enumerate(rows):
            if r is None:
                continue
            if r.stop and ended[b] is None and self._stop_in_tail(r, before[b]):
                text = self.detokenize(r.tokens)   # about once a reply: where exactly it stops
                hits = [i for i in (text.find(s) for s in r.stop) if i >= 0]
                if hits:
                    r.stop_at, ended[b] = min(hits), "stop"
            self.held[b] = (r.prompt + r.tokens)[:lengths[b]]
            r.events.put(("tokens", r.tokens[before[b]:]))
            if ended[b] == "stop":
                r.events.put(("done", "stop"))
            elif ended[b] == "cache_full" or len(r.tokens) >= r.max_tokens:
                r.events.put(("done", "length"))
            elif not r.cancelled:
                continue
            rows[b] = None

    def _stop_in_tail(self, r: Request, new_from: int) -> bool:
        """Whether a stop string ends in the tokens from `new_from` on. Only the tail is decoded
        (the whole reply each chunk is quadratic in its length): a stop string of L characters
        spans at most 4L bytes, so at most 4L tokens, and one more token keeps a character cut
        at the window's start out of it."""
        back = 4 * max(len(s) for s in r.stop) + 1
        text = self.detokenize(r.tokens[max(0, new_from - back):])
        return any(s in text for s in r.stop)

    def _decode(self, cache: engine_lib.Rows, rows, going: list[bool], limit: int):
        """One decode call of up to `limit` tokens for each `going` row (the rest ride along
        idle). Token t of a reply is sampled with fold_in(fold_in(key(seed), c), t - c), c = t
        rounded down to a multiple of `chunk`, and a call never crosses a multiple of `chunk`:
        a row samples the same tokens whether its reply is decoded a chunk or a token a call,
        whatever else is in the batch."""
        live = [r or Request([], 0) for r in rows]
        done = [len(r.tokens) for r in live]
        starts = [n - n % self.chunk for n in done]
        keys = engine_lib.row_keys(_seed_keys(np.array([r.seed for r in live], np.uint32)),
                                   np.array(starts, np.int32))
        allow = None
        if any(r.matcher is not None or r.allow is not None for r in live):
            allow = constrain.allow_all(self.batch, self.vocab_size)
            for b, r in enumerate(live):
                if r.matcher is not None:
                    constrain.fill(r.matcher, allow, b)
                elif r.allow is not None:
                    allow[b] = r.allow
        max_new = [min(r.max_tokens - n, self.chunk - (n - c), limit) if go else 0
                   for r, n, c, go in zip(live, done, starts, going)]
        return cache.decode(keys, max_new_tokens=max_new, temperature=[r.temperature for r in live],
                            top_p=[r.top_p for r in live], stop_tokens=self.stop_ids, allow=allow,
                            first_step=[n - c for n, c in zip(done, starts)],
                            # the most any row may ask, whenever one asks: one compiled shape
                            top_logprobs=chat_api.TOP_LOGPROBS if any(r.top_logprobs for r in live)
                            else 0)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Generated tokens a second over the last `window_s` seconds."""
        now = time.monotonic()
        return sum(n for t, n in self.recent if now - t <= window_s) / window_s


# ----------------------------------------------------------------------------- requests

@dataclasses.dataclass
class ChatCall:
    request: Request
    stream: bool
    include_usage: bool
    n: int = 1
    logprobs: bool = False

    def requests(self) -> list[Request]:
        """The engine's requests: one per choice, choice k seeded seed + k (so it samples what a
        request with that seed and n=1 would), each a copy of choice 0's row once prefilled."""
        first = self.request
        return [first] + [dataclasses.replace(
            first, seed=(first.seed + k) % 2 ** 32, tokens=[], logprobs=[], top=[],
            events=queue.Queue(), leader=first,
            matcher=None if first.matcher is None else first.matcher.deep_copy())
            for k in range(1, self.n)]


def _constraint(req: chat_api.ChatRequest, tools, grammars: constrain.Grammars | None):
    """(matcher, allow) of the request's response_format / tool_choice (constrain.py)."""
    choice = req.tool_choice or "auto"
    if isinstance(choice, chat_api.NamedToolChoice):
        choice = choice.model_dump()
    fmt = req.response_format.model_dump() if req.response_format else {}
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        # the reply is text: no call token, and the format, if any, holds for it
        tools = None
    # A grammar that does not compile: the response format's schema unless calls are forced
    # (then only the tools' schemas are in it).
    blame = "tools" if choice == "required" or isinstance(choice, dict) or \
        fmt.get("type") in (None, "text") else "response_format"
    try:
        grammar = grammars.grammar(fmt, choice, tools, parallel) if grammars else None
        matcher = grammars.matcher(grammar, blame) if grammar is not None else None
    except constrain.ConstraintError as e:
        raise ApiError(400, str(e), e.param, "invalid_value") from None
    try:
        allow = grammars.ban_calls() if grammars and choice == "none" and matcher is None else None
    except constrain.ConstraintError as e:
        raise ApiError(400, str(e), e.param, "unsupported_value") from None
    if matcher is None and allow is None and (fmt.get("type") not in (None, "text") or
                                              choice not in ("none", "auto")):
        raise ApiError(400, "structured outputs are not enabled on this server",
                       "response_format", "unsupported_value")
    return matcher, allow


def parse_chat(body: Any, model_name: str, tok: tokenizer_lib.ChatTokenizer, cache_len: int,
               enable_thinking: bool, default_max_tokens: int | None = None,
               grammars: constrain.Grammars | None = None) -> ChatCall:
    """A /v1/chat/completions body -> a Request for the engine; ApiError says what is wrong
    (chat_api: the body's own checks). A request without max_tokens gets
    `default_max_tokens` (None: the rest of the cache). grammars: what enforces response_format
    and tool_choice (None: only text and "auto")."""
    req = chat_api.parse(body)
    if req.model != model_name:
        raise ApiError(404, f"model {req.model!r} does not exist; this server has "
                            f"{model_name!r}", "model", "model_not_found")
    tools = body.get("tools") or None
    n, logprobs, top = req.n or 1, bool(req.logprobs), req.top_logprobs or 0
    if top and not logprobs:
        raise ApiError(400, "'top_logprobs' needs logprobs true", "top_logprobs", "invalid_value")
    matcher, allow = _constraint(req, tools, grammars)
    # A constrained reply starts at its first token (the grammar has no <think> block).
    thinking = (enable_thinking if req.chat_template_kwargs is None or
                req.chat_template_kwargs.enable_thinking is None else
                req.chat_template_kwargs.enable_thinking) and matcher is None
    try:
        prompt = tok.render(body["messages"], tools, add_generation_prompt=True,
                            enable_thinking=thinking).ids
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ApiError(400, f"messages could not be rendered: {type(e).__name__}: {e}",
                       "messages") from None
    if len(prompt) >= cache_len:
        raise ApiError(400, f"this model's maximum context length is {cache_len} tokens; the "
                            f"prompt has {len(prompt)} (and the reply needs at least one more)",
                       "messages", "context_length_exceeded")
    max_tokens = req.max_completion_tokens or req.max_tokens
    max_tokens = min(max_tokens or default_max_tokens or cache_len, cache_len - len(prompt))
    seed = int.from_bytes(os.urandom(4), "little") if req.seed is None else req.seed % 2 ** 32
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return ChatCall(
        Request(prompt, max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, seed=seed, matcher=matcher,
                allow=allow, stop=stop, top_logprobs=top),
        stream=bool(req.stream), n=n, logprobs=logprobs,
        include_usage=bool(req.stream_options and req.stream_options.include_usage))


# ----------------------------------------------------------------------------- replies

def reply_text(tok: tokenizer_lib.ChatTokenizer, request: Request) -> str:
    """The reply's text, cut before the stop string that ended it."""
    text = tok.decode(request.tokens)
    return text if request.stop_at is None else text[:request.stop_at]


def reply_message(tok: tokenizer_lib.ChatTokenizer, request: Request, call_prefix: str) -> dict:
    message = tokenizer_lib.parse_reply(reply_text(tok, request), call_prefix).message
    if message.get("tool_calls") and not message["content"]:
        message["content"] = None   # what OpenAI returns for a reply that is only calls
    return message


def finish_reason(engine_reason: str, message: dict) -> str:
    if engine_reason == "length":
        return "length"
    return "tool_calls" if message.get("tool_calls") else "stop"


_MARKERS = (tokenizer_lib.TOOL_CALL, tokenizer_lib.TOOL_CALL_END, tokenizer_lib.IM_END,
            tokenizer_lib.ENDOFTEXT, tokenizer_lib.THINK)


def streamable_content(text: str, stop: tuple[str, ...] = ()) -> str:
    """The prefix of the reply's final `content` that `text`, a partial reply, already fixes.

    What follows a marker (a tool call, the end of turn, an open <think>, a stop string) is held
    back, and so are a trailing piece of a marker, a trailing incomplete UTF-8 character and one
    trailing newline (parse drops the one before a tool call). Only a <think> opened mid-reply,
    after streamed text, can make the streamed content differ from the final one (parse then
    keeps what follows it).
    """
    if tokenizer_lib.THINK_END in text:
        text = text.partition(tokenizer_lib.THINK_END)[2].lstrip("\n")
    for marker in _MARKERS + stop:
        text = text.partition(marker)[0]
    for marker in _MARKERS + stop:
        for k in range(len(marker) - 1, 0, -1):
            if text.endswith(marker[:k]):
                text = text[:-k]
                break
    return text.rstrip("\ufffd").removesuffix("\n")


def usage(*requests: Request) -> dict:
    """One prompt (the choices share it), every choice's generated tokens."""
    n, m = len(requests[0].prompt), sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
            "prompt_tokens_details": {"cached_tokens": requests[0].cached}}


def logprobs_content(tok: tokenizer_lib.ChatTokenizer, request: Request, start: int = 0,
                     end: int | None = None) -> list[dict]:
    """OpenAI's choice.logprobs.content for tokens start:end of the reply (the end-of-turn token
    left out), each with its `top_logprobs` alternatives if asked."""
    end = len(request.tokens) if end is None else end
    if end and end == len(request.tokens) and request.tokens[-1] in tok.stop_ids:
        end -= 1

    def entry(i: int, lp: float) -> dict:
        text = tok.decode([i])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in request.top[k]]
             if request.top_logprobs else []}
            for k, (i, lp) in enumerate(zip(request.tokens[start:end],
                                            request.logprobs[start:end]), start)]


# ----------------------------------------------------------------------------- HTTP (ASGI)

class _Events:
    """A request's event channel from the engine's thread into the event loop (the engine
    calls `put` as on a queue.Queue; the handler awaits `get`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self):
        return await self.queue.get()


class _Tagged:
    """Choice k's engine events into its stream's one channel, as (k, event)."""

    def __init__(self, channel: _Events, k: int):
        self.channel, self.k = channel, k

    def put(self, item) -> None:
        self.channel.put((self.k, item))


class Metrics:
    """The server's Prometheus metrics (GET /metrics), in a registry of its own: counters of
    requests and prompt tokens (cached: reused from a row's cache), and what the engine reports
    when scraped (queue depth, busy rows, generated tokens, tokens/s over the last 10 s)."""

    def __init__(self, engine: Engine):
        self.registry = prometheus_client.CollectorRegistry()
        counter = functools.partial(prometheus_client.Counter, registry=self.registry)
        self.requests = counter("tarl_serve_requests", "chat completion requests accepted")
        self.prompt_tokens = counter("tarl_serve_prompt_tokens", "prompt tokens of accepted requests")
        self.cached_tokens = counter("tarl_serve_cached_prompt_tokens",
                                     "prompt tokens a row's cache already held (not prefilled)")
        self.engine = engine
        self.registry.register(self)

    def collect(self):
        e, family = self.engine, prometheus_client.core
        yield family.GaugeMetricFamily("tarl_serve_queue_depth", "requests waiting for a row",
                                       value=e.waiting.qsize())
        yield family.GaugeMetricFamily("tarl_serve_busy_rows", "rows decoding a request",
                                       value=e.busy)
        yield family.GaugeMetricFamily("tarl_serve_rows", "rows of the batch", value=e.batch)
        yield family.CounterMetricFamily("tarl_serve_generated_tokens", "tokens sampled",
                                         value=e.generated)
        yield family.GaugeMetricFamily("tarl_serve_tokens_per_second",
                                       "tokens sampled a second, last 10 s", value=e.tokens_per_s())

    def text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class ChatServer:
    """The app (Starlette) on uvicorn. Limits, each a clear 4xx: a body over `max_body_bytes`
    (413, refused from Content-Length before it is read, or while reading a chunked one), a
    prompt whose characters alone exceed the cache (400, before tokenising), JSON nested too
    deeply (400); an idle keep-alive connection is closed after `idle_timeout_s`. `api_key`: every
    request must carry `Authorization: Bearer <api_key>` (401 otherwise). A client that leaves
    frees its row at the engine's next chunk, streaming or not."""

    def __init__(self, engine: Engine, tok: tokenizer_lib.ChatTokenizer, model_name: str,
                 host: str = "127.0.0.1", port: int = 8000, enable_thinking: bool = True,
                 max_tokens: int | None = None, api_key: str | None = None,
                 max_body_bytes: int = 8 << 20, idle_timeout_s: float = 30.0):
        self.engine, self.tok, self.model_name = engine, tok, model_name
        self.enable_thinking, self.created = enable_thinking, int(time.time())
        self.max_tokens, self.api_key, self.max_body_bytes = max_tokens, api_key, max_body_bytes
        # A token spells at most this many characters: a prompt of more than cache_len times as
        # many characters cannot fit, whatever the tokenizer makes of it.
        self.max_token_chars = tok.max_token_chars
        self.grammars = constrain.Grammars(tok, engine.vocab_size)
        self.metrics = Metrics(engine)
        engine.detokenize = engine.detokenize or tok.decode
        routes = [Route("/v1/models", self._models, methods=["GET"]),
                  Route("/v1/models/{name:path}", self._model, methods=["GET"]),
                  Route("/v1/chat/completions", self._chat, methods=["POST"]),
                  Route("/health", self._health, methods=["GET"]),
                  Route("/metrics", self._metrics, methods=["GET"])]
        self.app = Starlette(routes=routes, exception_handlers={
            HTTPException: self._http_error, Exception: self._bug})
        self.socket = socket.create_server((host, port), backlog=256)
        self.server_address = self.socket.getsockname()[:2]
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self._guard, log_level="warning", timeout_keep_alive=int(max(1, idle_timeout_s)),
            lifespan="off", access_log=False, interface="asgi3"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}/v1"

    # -- lifecycle
    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> "ChatServer":
        """Serve from a background thread (tests, benchmarks, notebooks)."""
        self._thread = threading.Thread(target=self.serve_forever, name="serve-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server's thread ended before it started serving")
            time.sleep(0.01)
        return self

    def close(self):
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.socket.close()
        self.engine.close()

    # -- the ASGI entry: what must happen before Starlette reads anything
    async def _guard(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            why = None
            if self.api_key is not None and scope["path"] != "/health" and \
                    headers.get(b"authorization", b"") != f"Bearer {self.api_key}".encode():
                why = ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                               code="invalid_api_key", kind="authentication_error")
            length = headers.get(b"content-length", b"0")
            if why is None and (not length.isdigit() or int(length) > self.max_body_bytes):
                why = ApiError(413 if length.isdigit() else 400,
                               f"a request body of {length.decode(errors='replace')!r} bytes: the "
                               f"limit is {self.max_body_bytes}", code="request_too_large")
            if why is not None:
                await _error(why)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _http_error(self, request: StarletteRequest, exc: HTTPException):
        path = request.url.path
        if exc.status_code == 405:
            return _error(ApiError(405, f"{path} does not take {request.method}",
                                   code="method_not_allowed"))
        return _error(ApiError(exc.status_code, f"unknown route {request.method} {path}",
                               code="unknown_url"))

    async def _bug(self, request: StarletteRequest, exc: Exception):
        log.exception("request failed", exc_info=exc)
        return _error(ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error"))

    # -- routes
    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "tarl_jax"}

    async def _models(self, request: StarletteRequest):
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def _model(self, request: StarletteRequest):
        name = request.path_params["name"]
        if name != self.model_name:
            return _error(ApiError(404, f"model {name!r} does not exist; this server has "
                                        f"{self.model_name!r}", "model", "model_not_found"))
        return JSONResponse(self._card())

    async def _health(self, request: StarletteRequest):
        return JSONResponse({"status": "ok"})

    async def _metrics(self, request: StarletteRequest):
        return Response(self.metrics.text(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def _body(self, request: StarletteRequest) -> Any:
        """The JSON body, read up to max_body_bytes (a chunked body has no Content-Length)."""
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > self.max_body_bytes:
                raise ApiError(413, f"the request body exceeds {self.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}",
                           code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply",
                           code="invalid_json") from None

    async def _chat(self, request: StarletteRequest):
        try:
            body = await self._body(request)
            cache_len = self.engine.sampler.cache_len
            chars = _prompt_chars(body)
            if chars > cache_len * self.max_token_chars:
                raise ApiError(400, f"this model's maximum context length is {cache_len} tokens; "
                                    f"the messages hold {chars} characters, more than that many "
                                    "tokens can spell", "messages", "context_length_exceeded")
            call = parse_chat(body, self.model_name, self.tok, cache_len, self.enable_thinking,
                              self.max_tokens, self.grammars)
        except ApiError as e:
            return _error(e)
        reqs = call.requests()
        loop = asyncio.get_running_loop()
        events = _Events(loop)   # a stream's one channel: its choices' events, tagged
        for k, r in enumerate(reqs):
            r.events = _Tagged(events, k) if call.stream else _Events(loop)
            self.engine.submit(r)
        self.metrics.requests.inc()
        self.metrics.prompt_tokens.inc(len(call.request.prompt))
        rid = uuid.uuid4().hex[:24]
        head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": self.model_name}
        if call.stream:
            return StreamingResponse(self._stream(reqs, events, head, f"call_{rid}", call),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            reasons = [await self._wait(r, request) for r in reqs]
        except ApiError as e:
            return _error(e)
        finally:
            for r in reqs:
                r.cancelled = True   # a no-op once done; frees the row if the client left
        if None in reasons:          # the client left: nobody to answer
            return Response(status_code=499)
        self.metrics.cached_tokens.inc(reqs[0].cached)
        choices = []
        for k, (r, reason) in enumerate(zip(reqs, reasons)):
            message = reply_message(self.tok, r, f"call_{rid}" + (f"_{k}" if k else ""))
            choices.append({"index": k, "message": message, "finish_reason":
                            finish_reason(reason, message), "logprobs":
                            {"content": logprobs_content(self.tok, r)} if call.logprobs else None})
        return JSONResponse({**head, "object": "chat.completion", "usage": usage(*reqs),
                             "choices": choices})

    async def _wait(self, req: Request, client: StarletteRequest | None = None):
        """The engine's finish reason once the reply is whole; None if the client left first
        (polled while waiting, so an abandoned request frees its row)."""
        while True:
            try:
                kind, value = await asyncio.wait_for(req.events.get(), 0.5)
            except asyncio.TimeoutError:
                if client is not None and await client.is_disconnected():
                    req.cancelled = True
                    return None
                continue
            if kind == "done":
                return value
            if kind == "error":
                raise ApiError(500, value, kind="server_error")

    async def _stream(self, reqs: list[Request], events: _Events, head: dict, call_prefix: str,
                      call: ChatCall):
        """SSE frames, each choice's in turn as its tokens arrive (`index` k): a role delta,
        content deltas as the parse fixes them (with the log-probs of the tokens that arrived,
        if asked), the last delta with tool calls and the finish reason; then usage if asked,
        [DONE]. Starlette stops this generator when the client disconnects; `finally` then
        frees the rows. `events`: every choice's engine events, as (k, event)."""
        tok = self.tok
        scored, sent = [0] * len(reqs), [""] * len(reqs)

        def frame(k: int, delta: dict, reason: str | None = None, upto: int | None = None) -> str:
            lp = None
            if call.logprobs and upto is not None:
                lp, scored[k] = {"content": logprobs_content(tok, reqs[k], scored[k], upto)}, upto
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [
                {"index": k, "delta": delta, "logprobs": lp, "finish_reason": reason}]}) + "\n\n"

        try:
            for k in range(len(reqs)):
                yield frame(k, {"role": "assistant", "content": ""})
            left = len(reqs)
            while left:
                k, (kind, value) = await events.get()
                req = reqs[k]
                if kind == "error":   # the headers are out: the error travels as an event
                    yield f"data: {json.dumps(ApiError(500, value, kind='server_error').body())}\n\n"
                    return
                if kind == "tokens":
                    content = streamable_content(tok.decode(req.tokens), req.stop)
                    if len(content) > len(sent[k]) and content.startswith(sent[k]):
                        yield frame(k, {"content": content[len(sent[k]):]}, upto=len(req.tokens))
                        sent[k] = content
                    continue
                left -= 1
                message = reply_message(tok, req, call_prefix + (f"_{k}" if k else ""))
                last = {}
                rest = message["content"] or ""
                if rest.startswith(sent[k]) and rest != sent[k]:
                    last["content"] = rest[len(sent[k]):]
                if "reasoning_content" in message:
                    last["reasoning_content"] = message["reasoning_content"]
                if message.get("tool_calls"):
                    last["tool_calls"] = [{"index": i, **c}
                                          for i, c in enumerate(message["tool_calls"])]
                yield frame(k, last, finish_reason(value, message), upto=len(req.tokens))
            self.metrics.cached_tokens.inc(reqs[0].cached)
            if call.include_usage:
                chunk = {**head, "object": "chat.completion.chunk", "choices": [],
                         "usage": usage(*reqs)}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancelled = True


def _prompt_chars(body: Any) -> int:
    """Characters of text in a chat body's messages (what the prompt must at least spell)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return 0
    total = 0
    for m in body["messages"]:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def build(tok, cfg: qwen.DecoderConfig, params, *, model_name: str = "tarl", batch: int = 8,
          cache_len: int = 4096, chunk: int = 16, refill_wait_s: float = 0.01,
          host: str = "127.0.0.1", port: int = 8000, enable_thinking: bool = True,
          max_tokens: int | None = None, tensor: int = 1, **limits) -> ChatServer:
    """A ChatServer over a fresh Engine; `limits`: ChatServer's api_key, max_body_bytes,
    idle_timeout_s. tensor: devices of this host the weights and KV cache are cut over, by
    heads (-1: all)."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1 (or None: the rest of the cache)")
    # logprobs "raw": what OpenAI-style clients read as a token's log-prob, whatever the
    # temperature it was drawn at.
    sampler = sampler_lib.Sampler(cfg, None, cache_len=cache_len, logprobs="raw",
                                  mesh=sharding.local_tensor_mesh(tensor))
    sampler.place(params)
    return ChatServer(Engine(sampler, tok.stop_ids, batch, chunk, refill_wait_s), tok, model_name,
                      host, port, enable_thinking, max_tokens, **limits)


# ----------------------------------------------------------------------------- loading

def run_config(orbax: str) -> dict | None:
    """The config.json a trainer wrote in its workdir (`orbax` is the workdir or its
    checkpoints/ directory); None if there is none (a run from before it was written)."""
    from tarl_jax.rl import checkpoint
    here = pathlib.Path(orbax).resolve()
    for d in (here, here.parent) if here.name == checkpoint.STATES else (here,):
        if (d / "config.json").is_file():
            return json.loads((d / "config.json").read_text())
    return None


def as_rollouts(rollout) -> dict:
    """`build`'s settings that serve a trained policy as its run's rollouts sampled it: their
    cache, reply cap and devices, prompts without <think>. (Outside harnesses never send
    max_tokens, and an untrained policy would otherwise fill the cache.)"""
    return dict(cache_len=rollout.get("cache_len", 4096), max_tokens=rollout.get("max_turn_tokens"),
                tensor=rollout.get("tensor", 1), enable_thinking=False)


def defaults_from_run(args) -> None:
    """--orbax: what the flags leave unset comes from the run's own config (its model's
    architecture and tokenizer, rollout.tensor, cache_len and max_turn_tokens, prompts without
    <think> as rollouts render them); without one, the flags' plain defaults."""
    run = run_config(args.orbax) if args.orbax else None
    model = (run or {}).get("model", {})
    if args.orbax and args.arch is None:
        args.arch = model.get("hf_dir") or model.get("preset") or "tiny"
        if run is None:
            log.warning("%s has no config.json: serving it as --arch tiny", args.orbax)
    if args.orbax and args.tokenizer is None and run is not None:
        args.tokenizer = model.get("tokenizer") or None
    plain = {**as_rollouts({}), "enable_thinking": True}   # no run: a chat model's defaults
    for flag, value in (as_rollouts(run.get("rollout", {})) if run else plain).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def load_model(args) -> tuple[tokenizer_lib.ChatTokenizer, qwen.DecoderConfig, Any]:
    """(tokenizer, config, params on the first device) from the CLI's source flags."""
    from tarl_jax import components
    return components.load_model(dict(
        preset=args.arch if args.orbax else (args.preset or "tiny"), hf_dir=args.hf or "",
        gguf=args.gguf or "", orbax=args.orbax or "", step=args.step,
        tokenizer=args.tokenizer or "", dtype=args.dtype), seed=args.seed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="random weights of a named shape (models/presets.py)")
    src.add_argument("--hf", help="Hugging Face safetensors directory")
    src.add_argument("--gguf", help="llama.cpp GGUF file")
    src.add_argument("--orbax", help="trainer workdir (or its checkpoints/ directory)")
    ap.add_argument("--arch", help="--orbax: preset name or HF config.json (dir); default: the "
                                   "run's (its workdir's config.json), else tiny")
    ap.add_argument("--step", type=int, help="--orbax: checkpoint step (default: latest)")
    ap.add_argument("--tokenizer", help="tiny | qwen3 | DIR (default: the --hf dir's own, else tiny)")
    ap.add_argument("--dtype", default="float32", help="compute dtype")
    ap.add_argument("--seed", type=int, default=0, help="--preset: init seed")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default="tarl")
    ap.add_argument("--batch", type=int, default=8, help="rows decoded together")
    ap.add_argument("--cache-len", type=int, help="prompt + reply tokens per row (default: "
                    "--orbax's run's rollout.cache_len, else 4096)")
    ap.add_argument("--tensor", type=int,
                    help="devices the weights and KV cache are cut over, by heads (-1: all; "
                         "default: --orbax's run's rollout.tensor, else 1)")
    ap.add_argument("--chunk", type=int, default=16, help="tokens decoded between admissions")
    ap.add_argument("--refill-wait-ms", type=float, default=10.0,
                    help="after replies go out, wait this long for new requests to fill rows")
    ap.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction,
                    help="default of chat_template_kwargs.enable_thinking (default: on, off for "
                         "an --orbax run with its config, as its rollouts render prompts)")
    ap.add_argument("--max-tokens", type=int,
                    help="reply length for requests that set none (tau-bench's and tau2's harnesses "
                         "never do); default: --orbax's run's rollout.max_turn_tokens, else the "
                         "rest of the cache, as OpenAI does")
    ap.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: none)")
    ap.add_argument("--max-body-mb", type=float, default=8.0, help="larger bodies get a 413")
    ap.add_argument("--idle-timeout-s", type=float, default=30.0,
                    help="close keep-alive connections idle this long")
    args = ap.parse_args(argv)
    # INFO for our lines only: orbax and absl log every file they touch at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    defaults_from_run(args)
    tok, cfg, params = load_model(args)
    server = build(tok, cfg, params, model_name=args.model_name, batch=args.batch,
                   cache_len=args.cache_len, chunk=args.chunk,
                   refill_wait_s=args.refill_wait_ms / 1000, host=args.host, port=args.port,
                   enable_thinking=args.enable_thinking, max_tokens=args.max_tokens,
                   api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                   idle_timeout_s=args.idle_timeout_s, tensor=args.tensor)
    log.info("serving %r (%.1fM params) at %s", args.model_name, qwen.num_params(params) / 1e6,
             server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
