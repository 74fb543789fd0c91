"""The OpenAI-compatible server through the real `openai` client (and raw HTTP for what the
client cannot send): the micro preset with random weights and the tiny tokenizer, one server
for the module; tool calls with a scripted sampler whose output we choose."""
import argparse
import concurrent.futures
import http.client
import json
import time

import jax
import numpy as np
import openai
import pytest

from tarl_jax import serve
from tarl_jax.judge import llm
from tarl_jax.models import hf, presets, qwen
from tarl_jax.rl.checkpoint import Checkpointer
from tarl_jax.sampler import Completion, Sampler

NAME, CACHE = "micro-test", 1024
CHAT = [{"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "Where is my order #W123?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_order_details", "description": "Look up an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                   "required": ["order_id"]}}}]


@pytest.fixture(scope="module")
def server(tok, model):
    srv = serve.build(tok, *model, model_name=NAME, batch=8, cache_len=CACHE, chunk=16, port=0).start()
    yield srv
    srv.close()


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60, **kw)


def test_chat_round_trip_equals_direct_greedy_sampling(server, tok, model):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [NAME]
    resp = c.chat.completions.create(model=NAME, messages=CHAT, tools=TOOLS, max_tokens=24,
                                     temperature=0)
    prompt = tok.render(CHAT, TOOLS, add_generation_prompt=True).ids
    [direct] = Sampler(*model, cache_len=CACHE).generate(
        [prompt], max_new_tokens=24, temperature=0.0, stop_tokens=tok.stop_ids)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tok.parse(direct.tokens).message["content"]
    assert choice.finish_reason == {"stop": "stop", "length": "length"}[direct.finish_reason]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt), len(direct.tokens))
    assert resp.object == "chat.completion" and resp.model == NAME


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_concatenates_to_the_non_streamed_reply(server, temperature):
    c = client(server)
    kw = dict(model=NAME, messages=CHAT, max_tokens=50, temperature=temperature, seed=3)
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    assert len(deltas) >= 3   # one per 16-token chunk, not one at the end
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_does_not_depend_on_the_batch(server):
    c = client(server)
    ask = lambda seed: c.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=40, temperature=1.0, seed=seed).choices[0].message.content
    alone = ask(7)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        crowded = list(pool.map(ask, range(8)))   # seed 7 now shares the batch with 7 others
    assert crowded[7] == alone
    assert len(set(crowded)) > 1   # different seeds, different samples


def test_fifty_concurrent_requests_are_all_answered(server):
    c = client(server)

    def ask(i):
        r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"hi {i}"}],
                                      max_tokens=8, temperature=0.7, seed=i)
        return r.choices[0].finish_reason, r.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(ask, range(50), timeout=60))
    assert len(results) == 50 and all(1 <= n <= 8 for _, n in results)
    assert all(reason in ("stop", "length") for reason, _ in results)
    assert time.perf_counter() - start < 60


def raw(srv, method, path, body=b"", conn=None):
    conn = conn or http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)   # one keep-alive
    ok = dict(model=NAME, messages=CHAT, max_tokens=4)
    cases = [
        (b"{not json", 400, None, "invalid_json"),
        (dict(model=NAME), 400, "messages", "missing_required_parameter"),
        (dict(model=NAME, messages="hi"), 400, "messages", "invalid_type"),
        (dict(model=NAME, messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role",
         "invalid_value"),
        (dict(model=NAME, messages=[]), 400, "messages", "invalid_value"),
        (dict(model=NAME, messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
         "invalid_type"),
        (dict(model=NAME, messages=[{"role": "assistant", "tool_calls": [{"function": {}}]}]),
         400, "messages[0].tool_calls[0].function.name", "missing_required_parameter"),
        (dict(ok, tools=[{"type": "function"}]), 400, "tools[0].function",
         "missing_required_parameter"),
        (dict(ok, max_tokens=2.5), 400, "max_tokens", "invalid_type"),
        (dict(ok, seed=True), 400, "seed", "invalid_type"),
        (dict(ok, stop=5), 400, "stop", "invalid_type"),
        (dict(ok, tool_choice="always"), 400, "tool_choice", "invalid_value"),
        (dict(ok, response_format={"type": "xml"}), 400, "response_format.type", "invalid_value"),
        (dict(ok, stream_options={"include_usage": "yes"}), 400,
         "stream_options.include_usage", "invalid_type"),
        (dict(ok, temperature="hot"), 400, "temperature", "invalid_type"),
        (dict(ok, max_tokens=0), 400, "max_tokens", "invalid_value"),
        (dict(ok, n=65), 400, "n", "invalid_value"),
        (dict(ok, top_logprobs=3), 400, "top_logprobs", "invalid_value"),
        (dict(ok, logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
        (dict(ok, stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
        (dict(ok, stop=[""]), 400, "stop[0]", "invalid_value"),
        (dict(ok, stream="yes"), 400, "stream", "invalid_type"),
        (dict(ok, model="gpt-4.1"), 404, "model", "model_not_found"),
        (dict(ok, messages=[{"role": "user", "content": "word " * 3 * CACHE}]), 400, "messages",
         "context_length_exceeded"),
    ]
    for body, status, param, code in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, payload = raw(server, "POST", "/v1/chat/completions", data, conn)
        err = payload["error"]
        assert (got, err["param"], err["code"]) == (status, param, code), (body, payload)
        assert err["type"] == "invalid_request_error" and err["message"]
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405), ("GET", "/v1/models/other", 404)):
        assert raw(server, method, path, conn=conn)[0] == status, (method, path)
    # The openai client sees the same errors as its typed exceptions.
    with pytest.raises(openai.BadRequestError, match="context length"):
        client(server).chat.completions.create(
            **dict(ok, messages=[{"role": "user", "content": "x " * CACHE}]))
    status, payload = raw(server, "POST", "/v1/chat/completions", json.dumps(ok).encode(), conn)
    assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"


class ScriptedSampler(Sampler):
    """Replies with fixed ids (in the engine's chunks) instead of sampling: the server's
    parse -> tool_calls path with an output we choose."""

    def __init__(self, cfg, params, reply: list[int], **kw):
        super().__init__(cfg, params, **kw)
        self.reply, self.pos = reply, {}

    def append(self, state, new_tokens, audio=None):
        self.pos.update({b: 0 for b, t in enumerate(new_tokens) if len(t)})   # a new request
        return super().append(state, new_tokens, audio)

    def decode(self, state, *, max_new_tokens, **_):
        outs = []
        for b, m in enumerate(max_new_tokens):
            p = self.pos.get(b, 0)
            ids = self.reply[p:p + m] if m > 0 else []
            self.pos[b] = p + len(ids)
            done = bool(ids) and self.pos[b] == len(self.reply)
            outs.append(Completion(ids, [0.0] * len(ids), "stop" if done else "length"))
        return state, outs


@pytest.fixture(scope="module")
def tool_server(tok, model):
    call = {"name": "get_order_details", "arguments": {"order_id": "#W123"}}
    reply = tok.encode_reply({"role": "assistant", "content": "Let me look that up.",
                              "tool_calls": [{"function": call}]})
    engine = serve.Engine(ScriptedSampler(*model, reply, cache_len=CACHE), tok.stop_ids, batch=2, chunk=4)
    srv = serve.ChatServer(engine, tok, NAME, port=0).start()
    yield srv
    srv.close()


def test_tool_calls_in_the_shape_tau_bench_consumes(tool_server):
    c = client(tool_server)
    resp = c.chat.completions.create(model=NAME, messages=CHAT, tools=TOOLS, temperature=0.0)
    assert resp.choices[0].finish_reason == "tool_calls"
    # tau-bench's tool-calling agent: message.model_dump() goes into its history, and the first
    # call becomes Action(name, json.loads(arguments)).
    message = resp.choices[0].message.model_dump()
    assert message["role"] == "assistant" and message["content"] == "Let me look that up."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_order_details"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"order_id": "#W123"}
    # Its next request carries that message back with the tool's result.
    follow = CHAT + [message, {"role": "tool", "tool_call_id": call["id"], "name": "get_order_details",
                               "content": '{"status": "delivered"}'}]
    again = c.chat.completions.create(model=NAME, messages=follow, tools=TOOLS)
    assert again.usage.prompt_tokens > resp.usage.prompt_tokens
    # Streaming: text deltas, then the calls in the final delta.
    chunks = list(c.chat.completions.create(model=NAME, messages=CHAT, tools=TOOLS, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Let me look that up."
    [final] = [ch.choices[0] for ch in chunks if ch.choices[0].finish_reason]
    assert final.finish_reason == "tool_calls"
    assert final.delta.tool_calls[0].function.name == "get_order_details"
    assert final.delta.tool_calls[0].id.startswith("call_") and final.delta.tool_calls[0].index == 0


# Bodies as tau-bench's and tau2-bench's own harnesses sent them through litellm to this server
# (logged from real runs; texts shortened): none sets max_tokens, tau2 adds a seed and tool_choice.
USER_SIM = [{"role": "system", "content": "You are a user interacting with an agent.\n\nInstruction: "
                                          "You are Yusuf Rossi in 19122.\nRules:\n- One line at a time."},
            {"role": "user", "content": "Hi! How can I help you today?"}]
HARNESS_BODIES = {
    "tau-bench user": dict(model=NAME, messages=USER_SIM),
    "tau-bench agent": dict(model=NAME, messages=CHAT, temperature=0.0, tools=TOOLS),
    "tau2 user": dict(model=NAME, messages=USER_SIM, seed=626729, temperature=0.0),
    "tau2 agent": dict(model=NAME, messages=CHAT, tools=TOOLS, tool_choice="auto", seed=626729,
                       temperature=0.0),
}


def test_harness_requests_get_the_servers_default_reply_cap(tok, model):
    # An untrained policy rarely ends its turn: without a cap each reply would run to the end of
    # the cache, and the next turn's prompt would no longer fit.
    reply = tok.encode_reply({"role": "assistant", "content": "Let me look that up for you, one moment."})
    engine = serve.Engine(ScriptedSampler(*model, reply, cache_len=CACHE), tok.stop_ids, batch=2, chunk=4)
    srv = serve.ChatServer(engine, tok, NAME, port=0, max_tokens=6).start()
    try:
        assert len(reply) > 9
        for name, body in HARNESS_BODIES.items():
            status, payload = raw(srv, "POST", "/v1/chat/completions", json.dumps(body).encode())
            assert status == 200, (name, payload)
            [choice] = payload["choices"]
            assert payload["usage"]["completion_tokens"] == 6 and choice["finish_reason"] == "length"
            assert choice["message"]["content"] == tok.decode(reply[:6]), name
        # A client's own max_tokens still wins, above the default as below it.
        for n in (3, 9):
            status, payload = raw(srv, "POST", "/v1/chat/completions",
                                  json.dumps(dict(HARNESS_BODIES["tau2 user"], max_tokens=n)).encode())
            assert status == 200 and payload["usage"]["completion_tokens"] == n
    finally:
        srv.close()


def test_llm_judge_against_the_server_falls_back_without_losing_samples(server, tmp_path):
    task = {"instruction": "Return order #W1.", "domain": "retail", "outputs": [], "user_id": "u",
            "actions": [{"name": "get_order_details", "kwargs": {"order_id": "#W1"}}]}
    items = [(task, [{"role": "user", "content": "hi"}] +
              [{"role": "assistant", "content": f"turn {t}"} for t in range(n)]) for n in (1, 2, 3)]
    out, stats = llm.judge_batch(items, dict(base_url=server.url, api_key="x", model=NAME,
                                             max_tokens=8, max_repairs=1, max_retries=0, timeout=60,
                                             cache_dir=str(tmp_path)))
    # Random weights never finish a verdict in 8 tokens: each item is asked, asked again without
    # reasons (the answer was cut at max_tokens), re-asked once, then rule-judged.
    assert [len(j.scores) for j in out] == [1, 2, 3]
    assert all(j.source == "rule" and "invalid answer" in j.meta["error"] for j in out)
    assert stats["requests"] == 9 and stats["invalid_answers"] == 9
    assert stats["shortened"] == 3 and stats["repairs"] == 3
    assert stats["fallbacks"] == 3 and stats["dropped"] == 0 and stats["transport_retries"] == 0
    assert stats["tokens_in"] > 0 and 0 < stats["tokens_out"] <= 9 * 8


def test_checkpoint_sources_orbax_policy_only_and_hf(tmp_path, tok):
    cfg = presets.get("micro")
    params = jax.jit(lambda k: qwen.init_params(cfg, k))(jax.random.key(1))
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    state = {"step": np.int32(3), "params": {"policy": params},
             "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}}
    ckpt.save(3, state, {"history": []}, force=True)
    ckpt.close()
    hf.export_hf(params, cfg, tmp_path / "hf")
    none = dict(orbax=None, hf=None, gguf=None, preset=None, arch="micro", step=None, tokenizer=None,
                dtype="float32", seed=0)
    for source in (dict(orbax=str(tmp_path / "run")), dict(hf=str(tmp_path / "hf"))):
        loaded_tok, loaded_cfg, loaded = serve.load_model(argparse.Namespace(**{**none, **source}))
        assert loaded_cfg == cfg and loaded_tok.vocab_size == tok.vocab_size, source
        assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params)), source


def test_streamable_content_never_runs_ahead_of_the_parse():
    assert serve.streamable_content("Hello wor") == "Hello wor"
    assert serve.streamable_content("Sure.\n<tool_") == "Sure."
    assert serve.streamable_content("Sure.\n<tool_call>\n{") == "Sure."
    assert serve.streamable_content("<think>\nhmm") == ""
    assert serve.streamable_content("<think>\nhmm\n</think>\n\nOK<|im") == "OK"


def test_a_conversation_reuses_its_cached_prefix_and_answers_as_without_it(tok, model):
    srv = serve.build(tok, *model, model_name=NAME, batch=2, cache_len=CACHE, chunk=16, port=0).start()
    direct = Sampler(*model, cache_len=CACHE)

    def ask(messages):
        reply = client(srv).chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                                   temperature=0)
        prompt = tok.render(messages, add_generation_prompt=True).ids
        [want] = direct.generate([prompt], max_new_tokens=12, temperature=0.0,
                                 stop_tokens=tok.stop_ids)
        assert reply.choices[0].message.content == tok.parse(want.tokens).message["content"]
        return reply.usage.prompt_tokens_details.cached_tokens, prompt, want.tokens

    try:
        cached, first, generated = ask(CHAT)
        assert cached == 0
        # The client's next turn re-sends the conversation: the row's cache covers its prefix.
        follow = CHAT + [{"role": "assistant", "content": tok.parse(generated).message["content"]},
                         {"role": "user", "content": "And the other one?"}]
        cached, second, _ = ask(follow)
        # (all of the first prompt but its last newline, which the reply's text may absorb)
        assert cached == serve.common_prefix(first + generated, second) >= len(first) - 1
        # A new conversation takes the idle row instead of evicting the live one ...
        cached, *_ = ask([{"role": "system", "content": "Another shop."}, {"role": "user", "content": "hi"}])
        assert cached == 0
        # ... which still holds the whole prompt: only its last token is prefilled again.
        cached, *_ = ask(follow)
        assert cached == len(second) - 1
    finally:
        srv.close()


# ------------------------------------------------------------------ hostile clients (ASGI limits)

def raw_socket(srv, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes as they are (what http.client will not), read one JSON answer."""
    import socket
    with socket.create_connection(srv.server_address, timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        header, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += s.recv(65536)
        return int(header.split()[1]), json.loads(rest[:length])


def test_limits_answer_4xx_before_reading_or_tokenising(server):
    t0 = time.perf_counter()
    status, payload = raw_socket(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Length: 1000000000000\r\n\r\n")
    assert status == 413 and payload["error"]["code"] == "request_too_large"
    assert time.perf_counter() - t0 < 10
    # Chunked: no Content-Length to refuse up front; refused once past the limit.
    piece = b"x" * (1 << 20)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(9)) + b"0\r\n\r\n"
    status, payload = raw_socket(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                         b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert status == 413
    ok = dict(model=NAME, max_tokens=4)
    cases = [(json.dumps(dict(ok, messages=[{"role": "assistant", "content": "x", "tool_calls": 5}])),
              "messages[0].tool_calls", "invalid_type"),
             ("[" * 100_000 + "]" * 100_000, None, "invalid_json")]
    for body, param, code in cases:
        status, payload = raw(server, "POST", "/v1/chat/completions", body.encode())
        assert status == 400 and (payload["error"]["param"], payload["error"]["code"]) == (param, code)
    # More characters than the cache's tokens can spell: refused without tokenising them.
    huge = "a" * (CACHE * server.max_token_chars + 1)
    t0 = time.perf_counter()
    status, payload = raw(server, "POST", "/v1/chat/completions",
                          json.dumps(dict(ok, messages=[{"role": "user", "content": huge}])).encode())
    assert status == 400 and "characters" in payload["error"]["message"]
    assert payload["error"]["code"] == "context_length_exceeded"
    for method, status in (("OPTIONS", 405), ("PUT", 405)):
        assert raw(server, method, "/v1/chat/completions")[0] == status
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})


def test_api_key_is_required_when_set(tok, model):
    srv = serve.build(tok, *model, model_name=NAME, batch=2, cache_len=CACHE, port=0,
                      api_key="sekrit").start()
    try:
        status, payload = raw(srv, "GET", "/v1/models")
        assert status == 401 and payload["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(srv).models.list()
        assert [m.id for m in openai.OpenAI(base_url=srv.url, api_key="sekrit").models.list()] == [NAME]
        assert raw(srv, "GET", "/health")[0] == 200
    finally:
        srv.close()


def test_a_client_that_leaves_frees_its_request():
    """_wait polls the client while no event comes: gone -> None, and the request is cancelled
    (the engine frees its row at the next chunk)."""
    import asyncio

    class Gone:
        async def is_disconnected(self):
            return True

    async def go():
        req = serve.Request([1, 2], 8)
        req.events = serve._Events(asyncio.get_running_loop())
        return await serve.ChatServer._wait(None, req, Gone()), req

    reason, req = asyncio.run(go())
    assert reason is None and req.cancelled


SHARDED_SERVER = """
import json, urllib.request
import jax
from tarl_jax import serve
from tarl_jax.models import presets, qwen
from tarl_jax.models.tokenizer import ChatTokenizer, tiny_tokenizer_dir
assert len(jax.devices()) == 8
tok, cfg = ChatTokenizer(tiny_tokenizer_dir()), presets.get("tiny")
params = qwen.init_params(cfg, jax.random.key(0))
replies = []
for tensor in (1, 2):
    srv = serve.build(tok, cfg, params, cache_len=256, batch=2, port=0, tensor=tensor,
                      enable_thinking=False).start()
    try:
        assert len(srv.engine.sampler.params["embedding"].sharding.device_set) == tensor
        got = []
        for seed, temp in ((0, 0.0), (5, 1.0)):
            body = json.dumps({"model": "tarl", "max_tokens": 24, "temperature": temp, "seed": seed,
                               "messages": [{"role": "user", "content": "Where is order #W12?"}]})
            req = urllib.request.Request(srv.url + "/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                out = json.loads(r.read())
            got.append((out["choices"][0]["message"], out["usage"]))
        replies.append(got)
    finally:
        srv.close()
assert replies[0] == replies[1], replies
assert all(usage["completion_tokens"] > 0 for _, usage in replies[0]), replies
print("SAME", replies[0][1][1])
"""


def test_server_with_weights_cut_over_two_devices_replies_as_one_device():
    """--tensor 2 of 8 simulated devices: the same replies (greedy and seeded) as one device."""
    from tests.devices import run_with_devices
    out = run_with_devices(SHARDED_SERVER)
    assert out.returncode == 0 and "SAME" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def test_an_orbax_workdir_is_served_with_its_runs_own_config(tmp_path):
    """A trainer writes its config beside its checkpoints; `serve --orbax WORKDIR` takes the
    architecture, tokenizer and rollout limits from it where the flags say nothing."""
    from tarl_jax import configlib, trainer
    c = configlib.load("configs/tiny.py", "runlocal")
    c.model.preset, c.rollout.cache_len, c.rollout.max_turn_tokens = "micro", 1024, 40
    t = trainer.Trainer(c, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["preset"] == "micro"
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    params = t._initial_params
    ckpt.save(1, {"step": np.int32(1), "params": {"policy": params}}, {"history": []}, force=True)
    ckpt.close()
    unset = dict(hf=None, gguf=None, preset=None, arch=None, step=None, tokenizer=None,
                 dtype="float32", seed=0, tensor=None, cache_len=None, max_tokens=None,
                 enable_thinking=None)
    for where in ("run", "run/checkpoints"):
        args = argparse.Namespace(**unset, orbax=str(tmp_path / where))
        serve.defaults_from_run(args)
        assert (args.arch, args.tokenizer, args.tensor, args.cache_len, args.max_tokens,
                args.enable_thinking) == ("micro", "tiny", 1, 1024, 40, False), where
        _, cfg, loaded = serve.load_model(args)
        assert cfg == presets.get("micro")
        assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
    # flags win over the run's config; a workdir without one falls back to the plain defaults
    args = argparse.Namespace(**{**unset, "cache_len": 512, "enable_thinking": True},
                              orbax=str(tmp_path / "run"))
    serve.defaults_from_run(args)
    assert (args.cache_len, args.enable_thinking) == (512, True)
    (tmp_path / "bare").mkdir()
    args = argparse.Namespace(**unset, orbax=str(tmp_path / "bare"))
    serve.defaults_from_run(args)
    assert (args.arch, args.tensor, args.cache_len, args.max_tokens, args.enable_thinking) == \
        ("tiny", 1, 4096, None, True)
