"""The rest of the OpenAI surface harnesses and judges send, through the real `openai` client:
stop strings, logprobs / top_logprobs (checked against the sampler called directly), n > 1
(choice k = the n=1 reply of seed + k, streamed or not; the prompt prefilled once), /metrics."""

import numpy as np
import openai
import urllib.request
from prometheus_client.parser import text_string_to_metric_families

from tarl_jax import serve
from tarl_jax.sampler import Sampler

from tests.test_serve import CACHE, CHAT

NAME = "micro-test"   # conftest.micro_server


def ask(srv, **kw):
    c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=120)
    return c.chat.completions.create(**{"model": NAME, "messages": CHAT, "max_tokens": 40,
                                        "temperature": 1.0, **kw})


def streamed(srv, **kw):
    return "".join(c.choices[0].delta.content or "" for c in ask(srv, stream=True, **kw)
                   if c.choices)


def test_a_stop_string_cuts_the_reply_before_it_streamed_or_not(micro_server):
    checked = 0
    for seed in range(4):
        whole = ask(micro_server, seed=seed).choices[0].message.content
        # early (the first chunk) and late (chunks on: the engine decodes only a reply's tail)
        assert len(whole) > 60, whole
        for late in (whole[-7:-3], whole[12:15]):
            cut = ask(micro_server, seed=seed, stop=[late, "never-said"])
            assert late and cut.choices[0].message.content == whole[:whole.find(late)]
            assert cut.choices[0].finish_reason == "stop"
        stop = late
        assert cut.usage.completion_tokens <= ask(micro_server, seed=seed).usage.completion_tokens
        # (random weights write </think> at times, after which a stream's content and the final
        # parse may differ: serve.streamable_content. Compare where they agree without stop.)
        if streamed(micro_server, seed=seed) == whole:
            assert streamed(micro_server, seed=seed, stop=stop) == whole[:whole.find(stop)]
            checked += 1
    assert checked >= 2


def test_logprobs_are_the_models_own_and_top_logprobs_rank_them(micro_server, tok, model):
    r = ask(micro_server, temperature=0.0, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    prompt = tok.render(CHAT, add_generation_prompt=True).ids
    [direct] = Sampler(*model, cache_len=CACHE, logprobs="raw").generate(
        [prompt], max_new_tokens=40, temperature=0.0, stop_tokens=tok.stop_ids)
    ids = [i for i in direct.tokens if i not in tok.stop_ids]
    assert [e.token for e in content] == [tok.decode([i]) for i in ids]
    np.testing.assert_allclose([e.logprob for e in content], direct.logprobs[:len(ids)], atol=1e-5)
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy
    # at temperature 1 the log-probs stay the model's (raw), and each is at most the best one's
    sampled = ask(micro_server, seed=3, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert all(e.logprob <= e.top_logprobs[0].logprob + 1e-6 for e in sampled)
    assert any(e.logprob < e.top_logprobs[0].logprob - 1e-3 for e in sampled)   # not all argmax
    assert ask(micro_server, seed=3).choices[0].logprobs is None


class CountingSampler(Sampler):
    appended = 0

    def append(self, state, new_tokens, audio=None):
        CountingSampler.appended += sum(len(t) for t in new_tokens)
        return super().append(state, new_tokens, audio)


def test_n_choices_are_the_seeds_replies_and_share_one_prefill(tok, model):
    sampler = CountingSampler(*model, cache_len=CACHE, logprobs="raw")
    engine = serve.Engine(sampler, tok.stop_ids, batch=8, chunk=16)
    srv = serve.ChatServer(engine, tok, NAME, port=0).start()
    try:
        prompt = len(tok.render(CHAT, add_generation_prompt=True).ids)
        CountingSampler.appended = 0
        many = ask(srv, n=3, seed=11)
        assert CountingSampler.appended == prompt          # one prefill for three rows
        assert [c.index for c in many.choices] == [0, 1, 2]
        singles = [ask(srv, seed=11 + k) for k in range(3)]
        assert [c.message.content for c in many.choices] == \
            [s.choices[0].message.content for s in singles]
        assert len({c.message.content for c in many.choices}) == 3
        assert many.usage.prompt_tokens == prompt
        assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
        # streamed: each chunk names its choice; choice k's deltas are seed + k's own stream
        chunks = list(ask(srv, n=3, seed=11, stream=True, logprobs=True,
                          stream_options={"include_usage": True}))
        for k in range(3):
            mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == k]
            assert mine[0].delta.role == "assistant"
            assert "".join(c.delta.content or "" for c in mine) == streamed(srv, seed=11 + k)
            assert [c.finish_reason for c in mine if c.finish_reason] == \
                [many.choices[k].finish_reason]
            lps = [e.logprob for c in mine if c.logprobs for e in c.logprobs.content]
            whole = ask(srv, seed=11 + k, logprobs=True).choices[0].logprobs.content
            assert lps == [e.logprob for e in whole]
        assert chunks[-1].usage.completion_tokens == many.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == prompt
    finally:
        srv.close()


def test_metrics_in_prometheus_format(micro_server):
    before = _metrics(micro_server)
    r = ask(micro_server, seed=1, max_tokens=8)
    after = _metrics(micro_server)
    assert after["tarl_serve_requests_total"] == before.get("tarl_serve_requests_total", 0) + 1
    assert after["tarl_serve_generated_tokens_total"] - before["tarl_serve_generated_tokens_total"] \
        == r.usage.completion_tokens
    assert after["tarl_serve_prompt_tokens_total"] - before.get("tarl_serve_prompt_tokens_total", 0) \
        == r.usage.prompt_tokens
    assert after["tarl_serve_rows"] == 8 and after["tarl_serve_queue_depth"] == 0
    assert after["tarl_serve_busy_rows"] == 0 and after["tarl_serve_tokens_per_second"] > 0


def _metrics(srv) -> dict:
    with urllib.request.urlopen(srv.url.removesuffix("/v1") + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.name.endswith("_created")}


def test_a_stop_string_across_chunks_is_found_from_the_replys_tail(tok):
    """The engine decodes only a reply's tail each chunk: a stop string that began in an
    earlier chunk and ends in this one is still found; one wholly in earlier chunks was
    found then."""
    import types

    from tarl_jax import serve

    ids = tok.encode("the order #W1234 ships to 12 Main Street tomorrow, thank you")
    stop = "Main Street"
    text = tok.decode(ids)
    ends = next(k for k in range(len(ids) + 1) if stop in tok.decode(ids[:k]))
    r = serve.Request(prompt=[], max_tokens=64, tokens=list(ids[:ends]), stop=(stop,))
    eng = types.SimpleNamespace(detokenize=tok.decode)
    assert stop in text and ends < len(ids)
    assert serve.Engine._stop_in_tail(eng, r, ends - 1)        # only its last token is new
    assert not serve.Engine._stop_in_tail(eng, serve.Request(
        prompt=[], max_tokens=64, tokens=list(ids[:ends - 1]), stop=(stop,)), ends - 2)
