"""Training attention on long packed rows: the full square (attn_chunk=0) against query blocks
whose groups read only the keys causality lets them see (attn_chunk=C), and against blocks
skipped where causality or the packed segments hide them (attn_chunk=C with attn_sparse: "Cs"),
in one jitted SFT update.

    python -m tarl_jax.bench.attention [--shape tiny] [--rows 4] [--seq 4096]
        [--chunks 512,1024,512s] [--segment 1400] [--rounds 5]

The update is the warm start's (rl/step.py's step with the SFT loss, adamw) on --rows rows of
--seq tokens, each packed with segments of about --segment tokens (uniform in [segment/2,
3 segment/2], the last one cut to fit): the shape of level 1's warm start (8 dialogues of mean
1.4k tokens in 4 x 4096 rows). Every variant gets the same batch and weights; the first step's
loss of each is printed (equal: the same update). After a compiling step each, the variants take
turns, one step each per round, so load from other processes falls on all alike; best wall time
and best process CPU time a step are reported, and their ratio to the full square.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from tarl_jax import sharding
from tarl_jax.models import presets, qwen
from tarl_jax.rl import losses
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
                advantages=mask.astype(np.float32), logprobs=zeros, ref_logprobs=zeros)


def sparse_fraction(segment_ids: np.ndarray, chunk: int) -> float:
    """The share of the rows' full score squares `qwen._sparse_attention` computes: the
    (query block, key block) pairs at or below the diagonal whose segment ranges overlap."""
    b, t = segment_ids.shape
    n = t // chunk
    blk = segment_ids.reshape(b, n, chunk)
    lo = np.where(blk > 0, blk, np.iinfo(np.int32).max).min(-1)
    hi = np.where(blk > 0, blk, -1).max(-1)
    need = np.tril(np.ones((n, n), bool))[None] & (lo[:, :, None] <= hi[:, None, :]) \
        & (lo[:, None, :] <= hi[:, :, None])
    return float(need.sum()) / (b * n * n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help=f"one of {sorted(presets.PRESETS)}")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunks", default="512,1024,512s",
                    help="attn_chunk values to compare with 0; a trailing s: with attn_sparse")
    ap.add_argument("--segment", type=int, default=1400, help="mean packed segment length")
    ap.add_argument("--rounds", type=int, default=5)
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
    keys = S.BATCH_KEYS
    variants = {}
    for c in chunks:
        cfg = dataclasses.replace(base, attn_chunk=size(c), attn_sparse=c.endswith("s"))
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
    n_scores = {c: qwen.score_fraction(args.seq, size(c)) for c in chunks}
    for c in chunks:
        if c.endswith("s"):
            n_scores[c] = sparse_fraction(batch["segment_ids"], size(c))
    print(f"\n{args.shape}, {args.rows} x {args.seq} rows, segments ~{args.segment}: one SFT update")
    print(f"{'attn_chunk':>10s} {'scores':>7s} {'best wall s':>12s} {'best CPU s':>11s} "
          f"{'wall vs full':>13s} {'CPU vs full':>12s}")
    for c, (_, _, _, walls, cpus) in variants.items():
        print(f"{c:>10s} {n_scores[c]:7.2f} {min(walls):12.3f} {min(cpus):11.3f} "
              f"{full_w / min(walls):12.2f}x {full_c / min(cpus):11.2f}x")


if __name__ == "__main__":
    main()
