"""Requests/s and tokens/s of the OpenAI-compatible server vs the sampler called directly.

    python -m tarl_jax.bench.serve [--preset tiny] [--clients 1,8,32] [--new 32] [--batch 8]

Server: `serve.build` in this process on 127.0.0.1; C client threads, each with its own `openai`
client, send chat requests back to back (closed loop) until 4*C requests (at least 16) are
answered. Sampling at temperature 0.7 with a seed per request, max_tokens --new; the model may
stop earlier, so tokens/s counts the tokens actually returned (usage.completion_tokens).

Peer: the same Sampler (same preset, weights, batch rows and cache) called directly on the same
rendered prompts, min(C, batch) real rows per `generate` call and the rest idle (max_new 0), as
the server's batch has them: the same compiled work without HTTP, JSON, chat rendering/parsing
or chunked admission. "overhead" = direct tokens/s / server tokens/s (1.0 = free serving).
Compilation is paid in a warm-up before any timing. About a minute on 2 CPU cores.

--structured: the same requests again, each with a response_format JSON schema (an order
record), in the same run: the grammar's mask is computed on the host and the batch decodes a
token a call while any row has one (constrain.py). "cost/token" = free tok/s / structured tok/s.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import threading
import time

import jax
import numpy as np
import openai

from tarl_jax import components, serve
from tarl_jax.models import qwen
from tarl_jax.sampler import Sampler

# Prompts of 79-81 tiny-tokenizer tokens: all in one prefill bucket (64 < n <= 128), so the
# warm-up compiles every shape the timed runs use.
SYSTEM = ("You are a customer service agent of an online store. Be brief and precise. Identify "
          "the user before you look anything up.")


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Hello, I am user {i}. Where is my order #W{1000 + i}?"}]


ORDER = {"type": "json_schema", "json_schema": {"name": "order", "schema": {
    "type": "object", "additionalProperties": False, "required": ["order_id", "status", "note"],
    "properties": {"order_id": {"type": "string", "pattern": "^#W[0-9]{7}$"},
                   "status": {"enum": ["pending", "delivered", "cancelled"]},
                   "note": {"type": "string"}}}}}


def run_server(srv, clients: int, requests: int, new: int,
               **extra) -> tuple[float, int, list[float]]:
    """(seconds, completion tokens, per-request latencies) for `requests` requests; `extra`:
    more request fields (response_format)."""
    local = threading.local()

    def one(i):
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=300)
        t0 = time.perf_counter()
        r = local.client.chat.completions.create(model="bench", messages=messages(i), max_tokens=new,
                                                 temperature=0.7, seed=i, **extra)
        return r.usage.completion_tokens, time.perf_counter() - t0

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(requests)))
    return time.perf_counter() - start, sum(n for n, _ in out), [t for _, t in out]


def run_direct(sampler: Sampler, prompts: list[list[int]], clients: int, batch: int, new: int,
               stop_ids) -> tuple[float, int]:
    """(seconds, generated tokens) for the same prompts, min(clients, batch) real rows a call."""
    rows, tokens = min(clients, batch), 0
    start = time.perf_counter()
    for k in range(0, len(prompts), rows):
        real = prompts[k:k + rows]
        padded = real + [[0]] * (batch - len(real))
        max_new = [new] * len(real) + [0] * (batch - len(real))
        outs = sampler.generate(padded, max_new_tokens=max_new, temperature=0.7,
                                stop_tokens=stop_ids, seed=k)
        tokens += sum(len(o.tokens) for o in outs)
    return time.perf_counter() - start, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--structured", action="store_true",
                    help="also time the same requests held to a JSON schema")
    args = ap.parse_args(argv)
    extras = [{}] + ([{"response_format": ORDER}] if args.structured else [])

    tok, cfg, params = components.load_model({"preset": args.preset, "tokenizer": "tiny"})
    srv = serve.build(tok, cfg, params, model_name="bench", batch=args.batch,
                      cache_len=args.cache_len, chunk=args.chunk, port=0).start()
    sampler = Sampler(cfg, params, cache_len=args.cache_len)
    levels = [int(c) for c in args.clients.split(",")]
    lengths = [len(tok.render(messages(i), add_generation_prompt=True).ids)
               for i in range(max(16, 4 * max(levels)))]
    print(f"preset {args.preset}: {qwen.num_params(params) / 1e6:.2f}M params, jax "
          f"{jax.devices()[0].platform}; batch {args.batch}, cache {args.cache_len}, chunk "
          f"{args.chunk}; prompts {min(lengths)}-{max(lengths)} tokens, max_tokens {args.new}, "
          "temperature 0.7")
    try:
        t0 = time.perf_counter()
        for c in sorted(set(levels) | {args.batch}):   # compile every shape the timings will use
            for extra in extras:
                run_server(srv, c, c, args.new, **extra)
            prompts = [tok.render(messages(i), add_generation_prompt=True).ids for i in range(c)]
            run_direct(sampler, prompts, c, args.batch, args.new, tok.stop_ids)
        print(f"warm-up (compilation) {time.perf_counter() - t0:.1f} s\n")
        print(f"{'clients':>7} {'requests':>8} {'server req/s':>12} {'server tok/s':>12} "
              f"{'p50 latency s':>13} {'direct req/s':>12} {'direct tok/s':>12} {'overhead':>8}"
              + (f" {'json tok/s':>10} {'cost/token':>10}" if args.structured else ""))
        for c in levels:
            n = max(16, 4 * c)
            secs, toks, lat = run_server(srv, c, n, args.new)
            prompts = [tok.render(messages(i), add_generation_prompt=True).ids for i in range(n)]
            d_secs, d_toks = run_direct(sampler, prompts, c, args.batch, args.new, tok.stop_ids)
            line = (f"{c:>7} {n:>8} {n / secs:>12.1f} {toks / secs:>12.0f} "
                    f"{np.median(lat):>13.3f} {n / d_secs:>12.1f} {d_toks / d_secs:>12.0f} "
                    f"{(d_toks / d_secs) / (toks / secs):>7.2f}x")
            if args.structured:
                j_secs, j_toks, _ = run_server(srv, c, n, args.new, response_format=ORDER)
                line += f" {j_toks / j_secs:>10.0f} {(toks / secs) / (j_toks / j_secs):>9.2f}x"
            print(line)
    finally:
        srv.close()


if __name__ == "__main__":
    main()
