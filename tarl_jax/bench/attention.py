"""Training attention on long packed rows: the full square (attn_chunk=0) against query blocks
whose groups read only the keys causality lets them see (attn_chunk=C), and against blocks
skipped where causality or the packed segments hide them (attn_chunk=C with attn_sparse: "Cs"),
in one jitted SFT update.

    python -m tarl_jax.bench.attention [--shape tiny] [--rows 4] [--seq 4096]
        [--chunks 512,1024,512s] [--segment 1400] [--rounds 5]

The update is the warm start's (rl/step.py's step with the SFT loss, adamw) on --rows rows of
--seq tokens, each packed with segments of about --segment tokens (uniform in [segment/2,
3 segment/2], the last one cut to fit): the shape of level 1's warm start (8 dialogues of mean
1.4k tokens in 4 x 4096 rows). A random 30% of the positions are the loss mask's, and as in the
trainer's batches (`pack.policy_index`) only those go through the vocabulary projection. Every
variant gets the same batch and weights; the first step's loss of each is printed (equal: the
same update). After a compiling step each, the variants take turns, one step each per round, so
load from other processes falls on all alike; best wall time and best process CPU time a step
are reported, and their ratio to the full square.

Then, against this machine (unless --no-limits): each variant's model FLOP/s (`aot.train_flops`:
6ND, and attention over the pairs the packed segments let see) as a fraction of a 2048^3 matmul's
(`bench.limits`), and the rates XLA reaches on the model's own matmul shapes (its MLP, its
vocabulary projection, one block of the sparse attention's products): the ceiling a narrow model
meets long before the big matmul's.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from tarl_jax import aot, sharding
from tarl_jax.bench import limits
from tarl_jax.models import presets, qwen
from tarl_jax.rl import losses, pack
from tarl_jax.rl import step as S


def packed_batch(rows: int, seq: int, segment: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((rows, seq), np.int32), np.zeros((rows, seq), np.int32)
    for r in range(rows):
        start, i = 0, 1
        while start < seq:
            n = min(int(rng.integers(segment // 2, 3 * segment // 2 + 1)), seq - start)
            seg[r, start:start + n], pos[r, start:start + n] = i, np.arange(n)
            start, i = start + n, i + 1
    tokens = rng.integers(1, vocab, (rows, seq)).astype(np.int32)
    last = np.concatenate([seg[:, 1:] != seg[:, :-1], np.ones((rows, 1), bool)], 1)
    targets = np.where(last, 0, np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], 1))
    mask = ~last & (rng.random((rows, seq)) < 0.3)         # the replies: a third of a dialogue
    zeros = np.zeros((rows, seq), np.float32)
    return dict(tokens=tokens, positions=pos, segment_ids=seg, targets=targets, loss_mask=mask,
                advantages=mask.astype(np.float32), logprobs=zeros, ref_logprobs=zeros,
                policy_index=pack.policy_index(mask))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help=f"one of {sorted(presets.PRESETS)}")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunks", default="512,1024,512s",
                    help="attn_chunk values to compare with 0; a trailing s: with attn_sparse")
    ap.add_argument("--segment", type=int, default=1400, help="mean packed segment length")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-limits", dest="limits", action="store_false",
                    help="skip measuring this machine's matmul rate (bench.limits) and the "
                         "fraction of it each update reaches")
    args = ap.parse_args(argv)
    chunks = ["0"] + [c for c in args.chunks.split(",") if c]
    size = lambda c: int(c.rstrip("s"))  # noqa: E731
    bad = [c for c in chunks if size(c) and args.seq % size(c)]
    if bad:
        ap.error(f"--chunks {bad} do not divide --seq {args.seq}")
    base = presets.get(args.shape)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    params = qwen.init_params(base, jax.random.key(0))
    batch = packed_batch(args.rows, args.seq, args.segment, base.vocab_size)
    step_cfg = S.StepConfig(loss=losses.LossConfig(policy_loss="pg", agg="token_mean"))
    opt = S.make_optimizer(1e-3)
    keys = S.BATCH_KEYS + S.GATHER_KEYS
    cfgs = {c: dataclasses.replace(base, attn_chunk=size(c), attn_sparse=c.endswith("s"))
            for c in chunks}
    variants = {}
    for c, cfg in cfgs.items():
        sh = S.state_shardings(cfg, opt, False, mesh)
        fn = S.jit_train_step(cfg, step_cfg, opt, mesh, sh, keys)
        db = S.device_batch(batch, keys, mesh)
        new_state = lambda cfg=cfg, sh=sh: S.init_state(jax.tree.map(lambda x: x.copy(), params),
                                                        opt, cfg, False, sh)
        state, m = fn(new_state(), db, jax.random.key(0))     # compile, and the first loss
        print(f"attn_chunk={c}: first-step loss {float(m['loss']):.6f}", flush=True)
        variants[c] = [fn, db, state, [], []]
    for _ in range(args.rounds):
        for c, v in variants.items():
            fn, db, state, walls, cpus = v
            w0, c0 = time.perf_counter(), time.process_time()
            state, m = fn(state, db, jax.random.key(1))
            jax.block_until_ready(m["loss"])
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            v[2] = state
    full_w, full_c = min(variants["0"][3]), min(variants["0"][4])
    square = {c: aot.score_share(v, args.rows, args.seq, batch["segment_ids"])
              for c, v in cfgs.items()}
    print(f"\n{args.shape}, {args.rows} x {args.seq} rows, segments ~{args.segment}: one SFT update")
    print(f"{'attn_chunk':>10s} {'scores':>7s} {'best wall s':>12s} {'best CPU s':>11s} "
          f"{'wall vs full':>13s} {'CPU vs full':>12s}")
    for c, (_, _, _, walls, cpus) in variants.items():
        print(f"{c:>10s} {square[c]:7.2f} {min(walls):12.3f} {min(cpus):11.3f} "
              f"{full_w / min(walls):12.2f}x {full_c / min(cpus):11.2f}x")
    if args.limits:
        limits_table(args, base, batch, cfgs, {c: min(v[3]) for c, v in variants.items()})


def limits_table(args, cfg, batch, cfgs, best) -> None:
    """Each update's model FLOP/s (attention counted inside the packed segments) as a fraction
    of the 2048^3 matmul rate, beside the rates of the model's own matmul shapes."""
    lim = limits.measure()
    n = args.rows * args.seq
    chunk = min((v.attn_chunk for v in cfgs.values() if v.attn_chunk), default=args.seq)
    g = cfg.num_heads // cfg.num_kv_heads
    widths = {f"[{n}, {cfg.hidden_size}] x [{cfg.hidden_size}, {cfg.intermediate_size}] (MLP)":
              (n, cfg.hidden_size, cfg.intermediate_size),
              f"[{n}, {cfg.hidden_size}] x [{cfg.hidden_size}, {cfg.vocab_size}] (vocabulary)":
              (n, cfg.hidden_size, cfg.vocab_size),
              f"{args.rows * cfg.num_kv_heads} x [{g * chunk}, {cfg.head_dim}] x "
              f"[{cfg.head_dim}, {chunk}] (an attention block)":
              (args.rows * cfg.num_kv_heads, g * chunk, cfg.head_dim, chunk)}
    print(f"\n## Against this machine's limits ({lim.line()})")
    print("float32 matmuls at the model's own widths: " + "; ".join(
        f"{name} {limits.shape_rate(shape) / 1e9:.1f} GFLOP/s" for name, shape in widths.items()))
    print("\n| attn_chunk | model GFLOP (6ND + attention in segments) | executed GFLOP | best s "
          "| model GFLOP/s | of the float32 matmul rate |")
    print("|---|---|---|---|---|---|")
    for c, variant in cfgs.items():
        model, executed = aot.train_flops(variant, args.rows, args.seq,
                                          batch["policy_index"].shape[1], batch["segment_ids"])
        print(f"| {c} | {model / 1e9:.3g} | {executed / 1e9:.3g} | {best[c]:.3f} | "
              f"{model / best[c] / 1e9:.3g} | {model / best[c] / lim.matmul_f32:.1%} |", flush=True)


if __name__ == "__main__":
    main()
