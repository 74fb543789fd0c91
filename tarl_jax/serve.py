"""OpenAI-compatible chat server for any checkpoint the project loads (policy, judge, user sim).

    python -m tarl_jax.serve --preset tiny | --hf DIR | --gguf FILE | --orbax WORKDIR [--arch tiny|DIR]
        [--tokenizer tiny|qwen3|DIR] [--host 127.0.0.1] [--port 8000] [--model-name NAME]
        [--batch 8] [--cache-len 4096] [--chunk 16] [--refill-wait-ms 10] [--max-tokens N]

Endpoints: GET /v1/models, GET /v1/models/NAME, POST /v1/chat/completions (messages, tools,
temperature, top_p, max_tokens | max_completion_tokens, seed, n=1, stream with
stream_options.include_usage, chat_template_kwargs.enable_thinking). The prompt is
`ChatTokenizer.render(messages, tools, add_generation_prompt=True)`; the reply is
`ChatTokenizer.parse(generated ids)`: tool calls come back as OpenAI `tool_calls` (ids unique per
request), `<think>` as `reasoning_content`. `response_format` is accepted but not enforced (no
constrained decoding: a judge must validate what it gets, and ours does); `stop` strings,
`logprobs` and tool_choice other than "auto" are refused with a 400 rather than ignored.
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.

Batching. One worker thread owns the jitted Sampler and a DecodeState of `batch` rows. It decodes
all busy rows `chunk` tokens at a time; between chunks finished rows are freed and waiting
requests are prefilled into free rows (a row is recycled by setting its length back, to 0 or to
the prefix it keeps: a query at position p only attends to cache slots <= p, so stale entries
are invisible). So a request never
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

Weights live on one device (the first). An orbax source is a trainer workdir: only
params["policy"] of the latest (or --step) checkpoint is read, with the architecture from --arch
(a preset name or an HF config.json / its directory); scan_layers is read off the checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import jax
import jax.numpy as jnp
import numpy as np

from tarl_jax import sampler as sampler_lib
from tarl_jax.models import qwen
from tarl_jax.models import tokenizer as tokenizer_lib

log = logging.getLogger("tarl_jax.serve")

ROLES = ("system", "user", "assistant", "tool")


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


# A row's key for its next chunk: depends on the request's seed and progress only.
_chunk_keys = jax.jit(jax.vmap(lambda seed, done: jax.random.fold_in(jax.random.key(seed), done)))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class Engine:
    """Continuous batching over one Sampler, driven by one worker thread.

    `submit` returns a Request whose `events` queue receives ("tokens", [ids]) per chunk, then
    ("done", finish_reason) or ("error", message).
    """

    def __init__(self, sampler: sampler_lib.Sampler, stop_ids, batch: int = 8, chunk: int = 16,
                 refill_wait_s: float = 0.01):
        self.sampler, self.stop_ids, self.batch, self.chunk = sampler, list(stop_ids), batch, chunk
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

    def _fresh_state(self):
        s = self.sampler
        return sampler_lib.init_state(s.cfg, self.batch, s.cache_len, s.cache_dtype)

    def _run(self):
        rows: list[Request | None] = [None] * self.batch
        state = self._fresh_state()
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
                busy = sum(r is not None for r in rows) + len(new)
                state = self._step(state, rows, new)
                freed = sum(r is not None for r in rows) < busy
            except Exception as e:  # noqa: BLE001 -- fail the batch, keep serving
                log.exception("engine step failed")
                for b, r in list(enumerate(rows)) + list(new.items()):
                    if r is not None:
                        r.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                    rows[b] = None
                state = self._fresh_state()
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

    def _step(self, state, rows, new):
        if new:
            # Slots at and past a row's length are invisible to its queries and get overwritten.
            lengths = np.array(state.length)
            lengths[list(new)] = [new[b].cached for b in new]
            state = state._replace(length=jnp.asarray(lengths))
            state = self.sampler.append(state, [new[b].prompt[new[b].cached:] if b in new else []
                                                for b in range(self.batch)])
            for b, r in new.items():
                rows[b] = r
        live = [r or Request([], 0) for r in rows]
        state, outs = self.sampler.decode(
            state, max_new_tokens=[min(r.max_tokens - len(r.tokens), self.chunk) for r in live],
            temperature=[r.temperature for r in live], top_p=[r.top_p for r in live],
            stop_tokens=self.stop_ids,
            seed=_chunk_keys(np.array([r.seed for r in live], np.uint32),
                             np.array([len(r.tokens) for r in live], np.int32)))
        lengths = np.asarray(state.length)
        for b, (r, out) in enumerate(zip(rows, outs)):
            if r is None:
                continue
            r.tokens += out.tokens
            self.held[b] = (r.prompt + r.tokens)[:int(lengths[b])]
            r.events.put(("tokens", out.tokens))
            if out.finish_reason == "stop":
                r.events.put(("done", "stop"))
            elif out.finish_reason == "cache_full" or len(r.tokens) >= r.max_tokens:
                r.events.put(("done", "length"))
            elif not r.cancelled:
                continue
            rows[b] = None
        return state


# ----------------------------------------------------------------------------- requests

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _get(body: dict, name: str, types, default=None, check=None, why: str = ""):
    """body[name] (None -> default) checked against `types` (bools are not numbers) and `check`."""
    value = body.get(name)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", name,
                       "invalid_type")
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}'={value!r}: {why}", name, "invalid_value")
    return value


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages",
                       "invalid_type" if messages is not None else "missing_required_parameter")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} must be an object with 'role' in {ROLES}", where)
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise ApiError(400, f"{where}.content must be a string, a list of parts or null",
                           f"{where}.content")
        for j, call in enumerate(m.get("tool_calls") or ()):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                    not isinstance(fn.get("arguments"), (str, dict)):
                raise ApiError(400, f"{where}.tool_calls[{j}] needs function.name and "
                                    "function.arguments", f"{where}.tool_calls")


def _check_tools(tools) -> None:
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise ApiError(400, "'tools' must be a list of {'type': 'function', 'function': "
                            "{'name': ..., 'parameters': ...}}", "tools")


@dataclasses.dataclass
class ChatCall:
    request: Request
    stream: bool
    include_usage: bool


def parse_chat(body: Any, model_name: str, tok: tokenizer_lib.ChatTokenizer, cache_len: int,
               enable_thinking: bool, default_max_tokens: int | None = None) -> ChatCall:
    """A /v1/chat/completions body -> a Request for the engine; ApiError says what is wrong.
    A request without max_tokens gets `default_max_tokens` (None: the rest of the cache)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _get(body, "model", str)
    if model is None:
        raise ApiError(400, "'model' is required", "model", "missing_required_parameter")
    if model != model_name:
        raise ApiError(404, f"model {model!r} does not exist; this server has {model_name!r}",
                       "model", "model_not_found")
    _check_messages(body.get("messages"))
    tools = body.get("tools") or None
    if tools is not None:
        _check_tools(tools)
    _get(body, "n", int, 1, lambda n: n == 1, "only n=1 is supported")
    _get(body, "tool_choice", str, "auto", lambda c: c == "auto", "only 'auto' is supported")
    _get(body, "stop", (str, list), [], lambda s: not s,
         "stop sequences are not supported; replies end at the model's end-of-turn tokens")
    _get(body, "logprobs", bool, False, lambda x: not x, "logprobs are not supported")
    _get(body, "response_format", dict, {},   # accepted, not enforced (see the module doc)
         lambda f: f.get("type") in (None, "text", "json_object", "json_schema"),
         "type must be text, json_object or json_schema")
    kwargs = _get(body, "chat_template_kwargs", dict, {})
    thinking = _get(kwargs, "enable_thinking", bool, enable_thinking)
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
    max_tokens = _get(body, "max_completion_tokens", int, None, lambda n: n >= 1, "must be >= 1")
    max_tokens = max_tokens or _get(body, "max_tokens", int, None, lambda n: n >= 1, "must be >= 1")
    max_tokens = min(max_tokens or default_max_tokens or cache_len, cache_len - len(prompt))
    seed = _get(body, "seed", int, None)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed % 2 ** 32
    options = _get(body, "stream_options", dict, {})
    return ChatCall(
        Request(prompt, max_tokens,
                temperature=float(_get(body, "temperature", (int, float), 1.0, lambda t: 0 <= t <= 2,
                                       "must be in [0, 2]")),
                top_p=float(_get(body, "top_p", (int, float), 1.0, lambda p: 0 < p <= 1,
                                 "must be in (0, 1]")),
                seed=seed),
        stream=_get(body, "stream", bool, False),
        include_usage=_get(options, "include_usage", bool, False))


# ----------------------------------------------------------------------------- replies

def reply_message(tok: tokenizer_lib.ChatTokenizer, tokens: list[int], call_prefix: str) -> dict:
    message = tok.parse(tokens, call_prefix).message
    if message.get("tool_calls") and not message["content"]:
        message["content"] = None   # what OpenAI returns for a reply that is only calls
    return message


def finish_reason(engine_reason: str, message: dict) -> str:
    if engine_reason == "length":
        return "length"
    return "tool_calls" if message.get("tool_calls") else "stop"


_MARKERS = (tokenizer_lib.TOOL_CALL, tokenizer_lib.TOOL_CALL_END, tokenizer_lib.IM_END,
            tokenizer_lib.ENDOFTEXT, tokenizer_lib.THINK)


def streamable_content(text: str) -> str:
    """The prefix of the reply's final `content` that `text`, a partial reply, already fixes.

    What follows a marker (a tool call, the end of turn, an open <think>) is held back, and so
    are a trailing piece of a marker, a trailing incomplete UTF-8 character and one trailing
    newline (parse drops the one before a tool call). Only a <think> opened mid-reply, after
    streamed text, can make the streamed content differ from the final one (parse then keeps
    what follows it).
    """
    if tokenizer_lib.THINK_END in text:
        text = text.partition(tokenizer_lib.THINK_END)[2].lstrip("\n")
    for marker in _MARKERS:
        text = text.partition(marker)[0]
    for marker in _MARKERS:
        for k in range(len(marker) - 1, 0, -1):
            if text.endswith(marker[:k]):
                text = text[:-k]
                break
    return text.rstrip("\ufffd").removesuffix("\n")


def usage(request: Request) -> dict:
    n, m = len(request.prompt), len(request.tokens)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
            "prompt_tokens_details": {"cached_tokens": request.cached}}


# ----------------------------------------------------------------------------- HTTP

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: the openai client pools connections
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers (~40 ms a request).
    disable_nagle_algorithm = True
    server: "ChatServer"

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def _dispatch(self, method: str):
        try:
            # Read the whole body first: a keep-alive connection must not hold leftover bytes.
            length = self.headers.get("Content-Length") or "0"
            if not length.isdigit():
                self.close_connection = True
                raise ApiError(400, f"bad Content-Length {length!r}")
            raw = self.rfile.read(int(length))
            path = urlsplit(self.path).path.rstrip("/")
            name = self.server.model_name
            routes = {"/v1/models": ("GET", self._models),
                      f"/v1/models/{name}": ("GET", self._model),
                      "/v1/chat/completions": ("POST", lambda: self._chat(raw))}
            if path not in routes:
                if path.startswith("/v1/models/"):
                    raise ApiError(404, f"model {path.split('/', 3)[3]!r} does not exist; this "
                                        f"server has {name!r}", "model", "model_not_found")
                raise ApiError(404, f"unknown route {method} {path}", code="unknown_url")
            allowed, handle = routes[path]
            if method != allowed:
                raise ApiError(405, f"{path} takes {allowed}, not {method}", code="method_not_allowed")
            handle()
        except ApiError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 -- a bug answers 500; the server keeps serving
            log.exception("request failed")
            self._json(500, ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body())

    def _json(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "tarl_jax"}

    def _models(self):
        self._json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self):
        self._json(200, self._model_card())

    def _chat(self, raw: bytes):
        s = self.server
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        call = parse_chat(body, s.model_name, s.tok, s.engine.sampler.cache_len, s.enable_thinking,
                          s.max_tokens)
        request = s.engine.submit(call.request)
        rid = uuid.uuid4().hex[:24]
        head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": s.model_name}
        try:
            if call.stream:
                self._stream(request, head, f"call_{rid}", call.include_usage)
            else:
                reason = self._wait(request, lambda _: None)
                message = reply_message(s.tok, request.tokens, f"call_{rid}")
                self._json(200, {**head, "object": "chat.completion", "usage": usage(request),
                                 "choices": [{"index": 0, "message": message, "logprobs": None,
                                              "finish_reason": finish_reason(reason, message)}]})
        finally:
            request.cancelled = True   # a no-op once done; frees the row if the client left

    def _wait(self, request: Request, on_tokens) -> str:
        while True:
            kind, value = request.events.get()
            if kind == "tokens":
                on_tokens(value)
            elif kind == "done":
                return value
            else:
                raise ApiError(500, value, kind="server_error")

    def _stream(self, request: Request, head: dict, call_prefix: str, include_usage: bool):
        tok = self.server.tok
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")   # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

        def send(delta: dict, reason: str | None = None, **extra):
            chunk = {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        sent = ""

        def on_tokens(_):
            nonlocal sent
            content = streamable_content(tok.decode(request.tokens))
            if len(content) > len(sent) and content.startswith(sent):
                send({"content": content[len(sent):]})
                sent = content

        send({"role": "assistant", "content": ""})
        try:
            reason = self._wait(request, on_tokens)
        except ApiError as e:   # headers are out: the error travels as an event
            self.wfile.write(f"data: {json.dumps(e.body())}\n\n".encode())
            return
        message = reply_message(tok, request.tokens, call_prefix)
        last = {}
        rest = message["content"] or ""
        if rest.startswith(sent) and rest != sent:
            last["content"] = rest[len(sent):]
        if "reasoning_content" in message:
            last["reasoning_content"] = message["reasoning_content"]
        if message.get("tool_calls"):
            last["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
        send(last, finish_reason(reason, message))
        if include_usage:
            chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(request)}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class ChatServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256   # many clients connect at once; the default backlog is 5

    def __init__(self, engine: Engine, tok: tokenizer_lib.ChatTokenizer, model_name: str,
                 host: str = "127.0.0.1", port: int = 8000, enable_thinking: bool = True,
                 max_tokens: int | None = None):
        super().__init__((host, port), Handler)
        self.engine, self.tok, self.model_name = engine, tok, model_name
        self.enable_thinking, self.created = enable_thinking, int(time.time())
        self.max_tokens = max_tokens
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "ChatServer":
        """Serve from a background thread (tests, benchmarks, notebooks)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="serve-http", daemon=True)
        self._thread.start()
        return self

    def close(self):
        if self._thread is not None:
            self.shutdown()
        self.server_close()
        self.engine.close()


def build(tok, cfg: qwen.DecoderConfig, params, *, model_name: str = "tarl", batch: int = 8,
          cache_len: int = 4096, chunk: int = 16, refill_wait_s: float = 0.01,
          host: str = "127.0.0.1", port: int = 8000, enable_thinking: bool = True,
          max_tokens: int | None = None) -> ChatServer:
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1 (or None: the rest of the cache)")
    sampler = sampler_lib.Sampler(cfg, params, cache_len=cache_len)
    return ChatServer(Engine(sampler, tok.stop_ids, batch, chunk, refill_wait_s), tok, model_name,
                      host, port, enable_thinking, max_tokens)


# ----------------------------------------------------------------------------- loading

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
    ap.add_argument("--arch", default="tiny", help="--orbax: preset name or HF config.json (dir)")
    ap.add_argument("--step", type=int, help="--orbax: checkpoint step (default: latest)")
    ap.add_argument("--tokenizer", help="tiny | qwen3 | DIR (default: the --hf dir's own, else tiny)")
    ap.add_argument("--dtype", default="float32", help="compute dtype")
    ap.add_argument("--seed", type=int, default=0, help="--preset: init seed")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default="tarl")
    ap.add_argument("--batch", type=int, default=8, help="rows decoded together")
    ap.add_argument("--cache-len", type=int, default=4096, help="prompt + reply tokens per row")
    ap.add_argument("--chunk", type=int, default=16, help="tokens decoded between admissions")
    ap.add_argument("--refill-wait-ms", type=float, default=10.0,
                    help="after replies go out, wait this long for new requests to fill rows")
    ap.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=True,
                    help="default of chat_template_kwargs.enable_thinking")
    ap.add_argument("--max-tokens", type=int,
                    help="reply length for requests that set none (tau-bench's and tau2's harnesses "
                         "never do); default: the rest of the cache, as OpenAI does")
    args = ap.parse_args(argv)
    # INFO for our lines only: orbax and absl log every file they touch at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    tok, cfg, params = load_model(args)
    server = build(tok, cfg, params, model_name=args.model_name, batch=args.batch,
                   cache_len=args.cache_len, chunk=args.chunk,
                   refill_wait_s=args.refill_wait_ms / 1000, host=args.host, port=args.port,
                   enable_thinking=args.enable_thinking, max_tokens=args.max_tokens)
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
