"""Qwen2/2.5, Qwen3 and Llama decoders as one functional Flax (Linen) module.

The three families differ only in switches read from the Hugging Face `config.json`:
q/k/v bias (Qwen2), per-head RMSNorm on q and k before RoPE with an explicit head_dim (Qwen3),
tied embeddings (where the config says so). Parameters are a plain pytree; every parameter and
activation carries logical axis names, mapped onto a mesh by `tarl_jax.sharding`.

KV cache: keys/values live at slot == absolute position, so one rule masks everything (a query at
position p sees slots <= p). New tokens are scattered at their positions with mode="drop": pad
tokens given a position >= cache length vanish instead of shifting valid entries, and appending
a tool result or user turn to a live cache is the same code path as prefill.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SUPPORTED = {"qwen2", "qwen3", "llama"}
PAD_POSITION = 2**30  # position given to padding tokens: outside any cache, so their writes drop


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    dtype: str = "float32"          # compute dtype; parameters stay in param_dtype (fp32 master)
    param_dtype: str = "float32"
    scan_layers: bool = False       # one compiled layer body for deep models
    remat: str = "none"             # none | full | dots | dots_no_batch (see REMAT_POLICIES)
    model_type: str = "qwen3"
    # Training (no cache): attend in query blocks of this many tokens, each block rematerialised
    # in the backward pass, so scores take [B, H, chunk, T] instead of [B, H, T, T] (0: one block).
    attn_chunk: int = 0
    # With attn_chunk: go row by row and skip every (query block, key block) pair that causality
    # or the packed segments hide entirely (`_sparse_attention`: flash attention with its own
    # backward). Pays where the loop's per-block overhead is cheap (CPU); off, the blocks go in
    # a few large batched groups (accelerators).
    attn_sparse: bool = False

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "DecoderConfig":
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED:
            archs = hf.get("architectures")
            raise ValueError(
                f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"supported: {sorted(SUPPORTED)}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope scaling {rope!r}: only plain RoPE is implemented")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        heads = hf["num_attention_heads"]
        cfg = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=model_type,
        )
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        cfg.update(overrides)
        return cls(**cfg)

    def to_hf(self) -> dict:
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
        out = dict(
            architectures=[arch[self.model_type]], model_type=self.model_type,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings, torch_dtype=self.param_dtype,
            max_position_embeddings=32768,
        )
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
        return out


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _param(module, name, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    eps: float
    axis: str
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Matches HF: normalise in fp32, cast back, then scale.
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope(x, positions, theta):
    """Rotate-half RoPE on [B, T, H, D] at integer positions [B, T], computed in fp32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(positions, segment_ids, kv_len, cached: bool):
    """[B, 1, 1, T, S] boolean mask.

    Cached: keys are cache slots, a query at position p sees slots <= p. Uncached (training):
    causal by index within the same non-zero segment, so packed episodes never see each other.
    """
    if cached:
        slots = jnp.arange(kv_len)
        mask = slots[None, None, :] <= positions[:, :, None]
    else:
        t = positions.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            mask = mask & same & (segment_ids[:, :, None] != 0)
    return mask[:, None, None]


def _attend(qg, k, v, mask, dt):
    """qg [B, T, K, G, D] (query heads grouped by their kv head), k/v [B, S, K, D]."""
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(qg.shape[-1]))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _attend_cached(qg, k, v, positions, dt):
    """qg [B, T, K, G, D] against the cache's keys [B, K, D, S] and values [B, K, S, D], a query
    at position p seeing slots <= p. With the slots on the keys' last axis both products are
    plain batched matmuls over (B, K); written as matmuls, not einsums (whose dot XLA:CPU ran
    several times slower): a decode step's attention ~3x faster than einsums over a
    [B, S, K, D] cache (64 rows of 2048 slots; README, Benchmarks)."""
    b, t, kv, g, d = qg.shape
    s = k.shape[-1]
    q = jnp.transpose(qg, (0, 2, 1, 3, 4)).reshape(b, kv, t * g, d)
    scores = jnp.matmul(q, k).astype(jnp.float32).reshape(b, kv, t, g, s)
    scores = scores / jnp.sqrt(jnp.float32(d))
    visible = jnp.swapaxes(attention_mask(positions, None, s, True), 2, 3)   # [B, 1, T, 1, S]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(b, kv, t * g, s)
    out = jnp.matmul(probs, v).reshape(b, kv, t, g, d)
    return jnp.transpose(out, (0, 2, 1, 3, 4))


def score_fraction(t: int, chunk: int) -> float:
    """The share of a row's full [t, t] score square the training attention computes: 1 for one
    block, (g + 1) / 2g for `_chunked_attention`'s g groups."""
    if not 0 < chunk < t or t % chunk:
        return 1.0
    g = next(g for g in (4, 2, 1) if (t // chunk) % g == 0)
    return (g + 1) / (2 * g)


def _chunked_attention(qg, k, v, positions, segment_ids, chunk, dt):
    """Uncached attention one query block at a time (lax.map), each block under jax.checkpoint:
    peak score memory is one block's, forward and backward. The blocks go in up to 4 groups of
    consecutive queries, and a group reads keys only up to its own end: causality hides the
    rest, so a row computes (g + 1) / 2g of the full square's scores for g groups (0.625 for 4).
    Groups, not single blocks, keep each a loop: unrolled blocks kept their score buffers live
    together (the 8B step at 12k: 62 GiB a chip against 42 as one loop). Same mask as
    `attention_mask`."""
    b, t = qg.shape[:2]
    n = t // chunk
    groups = next(g for g in (4, 2, 1) if n % g == 0)
    seg = segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32)
    blocks = lambda x: jnp.moveaxis(x.reshape((b, x.shape[1] // chunk, chunk) + x.shape[2:]), 1, 0)
    out = []
    for g in range(groups):
        lo, hi = g * t // groups, (g + 1) * t // groups
        k_vis, v_vis, seg_vis = k[:, :hi], v[:, :hi], seg[:, :hi]

        @jax.checkpoint
        def one(args, k_vis=k_vis, v_vis=v_vis, seg_vis=seg_vis, hi=hi):
            q_blk, seg_blk, start = args
            rows = start + jnp.arange(chunk)
            mask = rows[:, None] >= jnp.arange(hi)[None, :]                  # causal by index
            mask = mask[None] & (seg_blk[:, :, None] == seg_vis[:, None, :]) \
                & (seg_blk[:, :, None] != 0)
            return _attend(q_blk, k_vis, v_vis, mask[:, None, None], dt)

        q = qg[:, lo:hi]
        if out:   # one group after the other: their loops' buffers are never live together
            out[-1], q = jax.lax.optimization_barrier((out[-1], q))
        res = jax.lax.map(one, (blocks(q), blocks(seg[:, lo:hi]), lo + jnp.arange(n // groups) * chunk))
        out.append(jnp.moveaxis(res, 0, 1).reshape(q.shape))
    return jnp.concatenate(out, axis=1)


def _block_pairs(segment_ids, chunk):
    """[B, n, n]: the (query block, key block) pairs of each row in which some query may see
    some key: key block <= query block, and the blocks' ranges of segment ids overlap (a
    superset of "share a segment": nothing visible is skipped)."""
    b, t = segment_ids.shape
    n = t // chunk
    seg_blk = segment_ids.reshape(b, n, chunk)
    # Padding (segment 0) sees nothing and is seen by nothing: out of every block's range.
    lo = jnp.where(seg_blk > 0, seg_blk, jnp.iinfo(jnp.int32).max).min(-1)
    hi = jnp.where(seg_blk > 0, seg_blk, -1).max(-1)
    qi, kj = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    return (kj <= qi)[None] & (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])


def _block_mask(i, j, seg_q, seg_k, chunk, groups):
    """[G*C, C]: which keys of block j each query of block i sees (its G heads stacked)."""
    rows, cols = i * chunk + jnp.arange(chunk), j * chunk + jnp.arange(chunk)
    see = (rows[:, None] >= cols[None]) & (seg_q[:, None] == seg_k[None]) & (seg_q[:, None] != 0)
    return jnp.tile(see, (groups, 1))


def _key_blocks(need_i, step, carry):
    """Fold `step(carry, j)` over the key blocks j that need_i [n] marks."""
    def body(carry, j):
        return jax.lax.cond(need_i[j], lambda c: step(c, j), lambda c: c, carry), None
    return jax.lax.scan(body, carry, jnp.arange(need_i.shape[0]))[0]


def _sparse_row_fwd(q, kt, v, seg, need, chunk, dt):
    """One row: q [n, K, G*C, D] (query blocks, heads grouped by kv head), kt [K, D, T], v [K, T, D]
    -> (out [n, K, G*C, D] float32, log-sum-exp [n, K, G*C]; +inf for a query that sees nothing)."""
    n, kh, gc, d = q.shape
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    neg = jnp.finfo(jnp.float32).min

    def one(args):
        q_blk, seg_q, i = args

        def step(carry, j):   # the online softmax of flash attention
            o, m, l = carry
            kb = jax.lax.dynamic_slice_in_dim(kt, j * chunk, chunk, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(v, j * chunk, chunk, axis=1)
            mask = _block_mask(i, j, seg_q, jax.lax.dynamic_slice_in_dim(seg, j * chunk, chunk),
                               chunk, gc // chunk)
            s = jnp.where(mask, jnp.matmul(q_blk, kb, preferred_element_type=jnp.float32) * scale,
                          neg)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            o = o * corr[..., None] + jnp.matmul(p.astype(dt), vb, preferred_element_type=jnp.float32)
            return o, m_new, l * corr + p.sum(-1)

        o, m, l = _key_blocks(need[i], step, (jnp.zeros((kh, gc, d), jnp.float32),
                                             jnp.full((kh, gc), neg), jnp.zeros((kh, gc), jnp.float32)))
        return (o / jnp.maximum(l, 1e-30)[..., None],
                jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), jnp.inf))

    return jax.lax.map(one, (q, seg.reshape(n, chunk), jnp.arange(n)))


def _sparse_row_bwd(q, kt, v, seg, need, out, lse, dout, chunk):
    """One row's (dq, dkt, dv) in float32, the layouts of `_sparse_row_fwd`'s inputs. Each
    needed block's probabilities come back from the saved log-sum-exp (one exp, no max and no
    second pass), as in flash attention's backward."""
    n, kh, gc, d = q.shape
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    neg = jnp.finfo(jnp.float32).min
    q, kt, v = q.astype(jnp.float32), kt.astype(jnp.float32), v.astype(jnp.float32)
    k, vt = jnp.swapaxes(kt, 1, 2), jnp.swapaxes(v, 1, 2)         # [K, T, D], [K, D, T]
    delta = jnp.sum(dout * out, -1)                                 # [n, K, G*C]

    def add_at(a, j, x):
        at = jax.lax.dynamic_slice_in_dim(a, j * chunk, chunk, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(a, at + x, j * chunk, 1)

    def query_block(carry, args):
        q_blk, do_blk, lse_blk, delta_blk, seg_q, i = args

        def step(carry, j):
            dq, dk, dv = carry
            kb = jax.lax.dynamic_slice_in_dim(kt, j * chunk, chunk, axis=2)
            mask = _block_mask(i, j, seg_q, jax.lax.dynamic_slice_in_dim(seg, j * chunk, chunk),
                               chunk, gc // chunk)
            p = jnp.exp(jnp.where(mask, jnp.matmul(q_blk, kb) * scale, neg) - lse_blk[..., None])
            dp = jnp.matmul(do_blk, jax.lax.dynamic_slice_in_dim(vt, j * chunk, chunk, axis=2))
            ds = p * (dp - delta_blk[..., None]) * scale            # [K, G*C, C]
            dq = dq + jnp.matmul(ds, jax.lax.dynamic_slice_in_dim(k, j * chunk, chunk, axis=1))
            dk = add_at(dk, j, jnp.matmul(jnp.swapaxes(ds, 1, 2), q_blk))
            dv = add_at(dv, j, jnp.matmul(jnp.swapaxes(p, 1, 2), do_blk))
            return dq, dk, dv

        dq, dk, dv = _key_blocks(need[i], step, (jnp.zeros((kh, gc, d), jnp.float32), *carry))
        return (dk, dv), dq

    zeros = jnp.zeros((kh, n * chunk, d), jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros),
                                (q, dout, lse, delta, seg.reshape(n, chunk), jnp.arange(n)))
    return dq, jnp.swapaxes(dk, 1, 2), dv


def _query_blocks(x, chunk):
    """[B, T, K, G, D] -> [B, n, K, G*C, D]: each block's queries, heads grouped by kv head, as
    the rows of one matmul per kv head."""
    b, t, kh, g, d = x.shape
    x = x.reshape(b, t // chunk, chunk, kh, g, d).transpose(0, 1, 3, 4, 2, 5)
    return x.reshape(b, t // chunk, kh, g * chunk, d)


def _from_query_blocks(x, g):
    b, n, kh, gc, d = x.shape
    x = x.reshape(b, n, kh, g, gc // g, d).transpose(0, 1, 4, 2, 3, 5)
    return x.reshape(b, n * (gc // g), kh, g, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_core(qg, k, v, segment_ids, chunk, dt):
    return _sparse_fwd(qg, k, v, segment_ids, chunk, dt)[0]


def _sparse_fwd(qg, k, v, segment_ids, chunk, dt):
    q = _query_blocks(qg, chunk)
    kt, vv = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)     # [B, K, D, T], [B, K, T, D]
    need = _block_pairs(segment_ids, chunk)
    out, lse = jax.lax.map(lambda a: _sparse_row_fwd(*a, chunk, dt), (q, kt, vv, segment_ids, need))
    res = (q, kt, vv, segment_ids, need, out, lse)
    return _from_query_blocks(out, qg.shape[3]).astype(dt), res


def _sparse_bwd(chunk, dt, res, dout):
    q, kt, vv, segment_ids, need, out, lse = res
    g = dout.shape[3]
    do = _query_blocks(dout.astype(jnp.float32), chunk)
    dq, dkt, dv = jax.lax.map(lambda a: _sparse_row_bwd(*a, chunk),
                              (q, kt, vv, segment_ids, need, out, lse, do))
    return (_from_query_blocks(dq, g).astype(q.dtype), dkt.transpose(0, 3, 1, 2).astype(kt.dtype),
            dv.transpose(0, 2, 1, 3).astype(vv.dtype), None)


_sparse_core.defvjp(_sparse_fwd, _sparse_bwd)


def _sparse_attention(qg, k, v, positions, segment_ids, chunk, dt):
    """Uncached attention over (row, query block, key block) triples, computing only the pairs
    (`_block_pairs`) in which some query may see some key, exact masks inside a computed pair: a
    packed row of two 2k episodes computes about a third of the causal square's key blocks.
    Flash attention with its own backward: key blocks are folded in with the online softmax and
    only each query's output and log-sum-exp are kept, so the backward pass recomputes one block
    at a time. Each block's heads of one kv head are one plain matmul ([G*C, D] x [D, C]), not an
    einsum (XLA:CPU runs the einsum's dot several times slower). Same result as
    `attention_mask`'s, up to summation order; a query that sees nothing (padding) gives 0.
    3.4x faster forward + backward than autodiff of the same online softmax (level 1's 32 x
    2048 update batch; README)."""
    seg = segment_ids if segment_ids is not None else jnp.ones(qg.shape[:2], jnp.int32)
    return _sparse_core(qg, k, v, seg, chunk, dt)


class Attention(nn.Module):
    cfg: DecoderConfig
    kv_window: int = 0      # see Decoder

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, layer):
        """cache: None (training) or every layer's (k, v) [L, B, S, Hkv, D], of which this layer
        (`layer`, an int or a traced index under nn.scan) writes and reads its own slice in
        place. Taking the slice out and setting it back, per layer, copied the whole cache two
        or three times a decode step (the tiny model at batch 64: 2.0x slower decode)."""
        c = self.cfg
        dt, pdt = c.dtype, c.param_dtype
        init = nn.initializers.normal(0.02)

        def proj(name, heads, axes_heads):
            w = _param(self, name, init, (c.hidden_size, heads, c.head_dim),
                       ("embed", axes_heads, "head_dim"), pdt)
            y = jnp.einsum("btd,dhk->bthk", x, w.astype(dt))
            if c.qkv_bias:
                b = _param(self, name + "_bias", nn.initializers.zeros, (heads, c.head_dim),
                           (axes_heads, "head_dim"), pdt)
                y = y + b.astype(dt)
            return y

        q = proj("q", c.num_heads, "q_heads")
        k = proj("k", c.num_kv_heads, "kv_heads")
        v = proj("v", c.num_kv_heads, "kv_heads")
        if c.qk_norm:
            q = RMSNorm(c.rms_eps, "head_dim", dt, pdt, name="q_norm")(q)
            k = RMSNorm(c.rms_eps, "head_dim", dt, pdt, name="k_norm")(k)
        q = _constrain(rope(q, positions, c.rope_theta), ("batch", "length", "q_heads", "head_dim"))
        k = _constrain(rope(k, positions, c.rope_theta), ("batch", "length", "kv_heads", "head_dim"))

        b, t = q.shape[:2]
        groups = c.num_heads // c.num_kv_heads
        qg = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
        chunk = c.attn_chunk
        if cache is not None:
            # (Indices around slices: the [B, T] index dimensions lead, as k and v's do.)
            ck, cv = cache
            rows = jnp.arange(x.shape[0])[:, None]
            ck = ck.at[layer, rows, :, :, positions].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[layer, rows, :, positions].set(v.astype(cv.dtype), mode="drop")
            w = self.kv_window if 0 < self.kv_window < ck.shape[-1] else ck.shape[-1]
            out = _attend_cached(qg, ck[layer, ..., :w].astype(dt), cv[layer, :, :, :w].astype(dt),
                                 positions, dt)
            cache = (ck, cv)
        elif 0 < chunk < t and t % chunk == 0:
            blocked = _sparse_attention if c.attn_sparse else _chunked_attention
            out = blocked(qg, k, v, positions, segment_ids, chunk, dt)
        else:
            mask = attention_mask(positions, segment_ids, k.shape[1], False)
            out = _attend(qg, k, v, mask, dt)
        out = out.reshape(b, t, c.num_heads, c.head_dim)
        wo = _param(self, "o", init, (c.num_heads, c.head_dim, c.hidden_size),
                    ("q_heads", "head_dim", "embed"), pdt)
        return jnp.einsum("bthk,hkd->btd", out, wo.astype(dt)), cache


class MLP(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        init = nn.initializers.normal(0.02)
        shape_in, shape_out = (c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size)
        gate = _param(self, "gate", init, shape_in, ("embed", "mlp"), c.param_dtype)
        up = _param(self, "up", init, shape_in, ("embed", "mlp"), c.param_dtype)
        down = _param(self, "down", init, shape_out, ("mlp", "embed"), c.param_dtype)
        h = jax.nn.silu(x @ gate.astype(c.dtype)) * (x @ up.astype(c.dtype))
        h = _constrain(h, ("batch", "length", "mlp"))
        return h @ down.astype(c.dtype)


class Block(nn.Module):
    cfg: DecoderConfig
    kv_window: int = 0

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, layer):
        c = self.cfg
        h, cache = Attention(c, self.kv_window, name="attn")(
            RMSNorm(c.rms_eps, "embed", c.dtype, c.param_dtype, name="input_norm")(x),
            positions, segment_ids, cache, layer)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_eps, "embed", c.dtype, c.param_dtype, name="post_norm")(x))
        return _constrain(x, ("batch", "length", "embed")), cache


class _ScanBlock(nn.Module):
    """Block with the (carry, per-layer input) signature nn.scan wants."""
    cfg: DecoderConfig
    kv_window: int = 0

    @nn.compact
    def __call__(self, carry, layer):
        x, positions, segment_ids, cache = carry
        block = Block
        if self.cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat])
        x, cache = block(self.cfg, self.kv_window, name="block")(x, positions, segment_ids, cache,
                                                                 layer)
        return (x, positions, segment_ids, cache), None


class Decoder(nn.Module):
    cfg: DecoderConfig
    # Cached calls attend to the first kv_window cache slots only (0: all). Slots are positions,
    # so a caller whose rows all end below the window (the sampler picks a power of two) skips
    # the empty tail of a long cache; same params, a different compiled program.
    kv_window: int = 0

    def setup(self):
        c = self.cfg
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), jnp.dtype(c.param_dtype))
        if c.scan_layers:
            self.layers = nn.scan(
                _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=0, out_axes=0, length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(c, self.kv_window, name="layers")
        else:
            block = Block if c.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[c.remat])
            self.layers = [block(c, self.kv_window, name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c.rms_eps, "embed", c.dtype, c.param_dtype)
        if not c.tie_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                (c.hidden_size, c.vocab_size), jnp.dtype(c.param_dtype))

    def embed(self, tokens):
        return jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.dtype)

    def __call__(self, tokens, positions, segment_ids=None, cache=None, embeds=None):
        """tokens/positions/segment_ids: [B, T] int32; cache: init_cache's or None.

        `embeds` [B, T, D] replaces the token embeddings (the Omni thinker scatters audio into
        them). Returns (final-normed hidden states [B, T, D], updated cache or None).
        """
        x = self.embed(tokens) if embeds is None else embeds.astype(self.cfg.dtype)
        x = _constrain(x, ("batch", "length", "embed"))
        # The whole cache goes through every layer (a scan's carry), each layer updating its
        # slice in place (Attention).
        kv = None if cache is None else (cache["k"], cache["v"])
        if self.cfg.scan_layers:
            (x, _, _, kv), _ = self.layers((x, positions, segment_ids, kv),
                                           jnp.arange(self.cfg.num_layers))
        else:
            out = ([], [])
            for i, layer in enumerate(self.layers):
                x, kv_i = layer(x, positions, segment_ids, None if kv is None else
                                (kv[0][i], kv[1][i]), 0)
                for part, a in zip(out, kv_i or ()):
                    part.append(a)
            kv = None if kv is None else tuple(map(tuple, out))
        return self.final_norm(x), None if kv is None else {"k": kv[0], "v": kv[1]}

    def output_matrix(self):
        """[D, V] projection to the vocabulary (chunked log-prob code slices it)."""
        return self.embedding.T if self.cfg.tie_embeddings else self.lm_head

    def logits(self, hidden):
        return (hidden @ self.output_matrix().astype(self.cfg.dtype)).astype(jnp.float32)


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype=None) -> dict:
    """Keys [L, B, Hkv, D, S] (slots last) and values [L, B, Hkv, S, D] (see _attend_cached);
    unscanned layers get one [1, ...] array each (a tuple), since XLA:CPU copied a layer's slice
    out of the stacked cache at every step (a decode step 1.4-2x slower)."""
    L, K, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    dtype = jnp.dtype(dtype or cfg.dtype)
    shapes = {"k": (batch, K, D, length), "v": (batch, K, length, D)}
    if cfg.scan_layers:
        return {kv: jnp.zeros((L, *shape), dtype) for kv, shape in shapes.items()}
    return {kv: tuple(jnp.zeros((1, *shape), dtype) for _ in range(L))
            for kv, shape in shapes.items()}


def cache_length(cache: dict) -> int:
    return jax.tree.leaves(cache["k"])[0].shape[-1]


CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "head_dim", "cache_length"),
              "v": ("layers", "batch", "kv_heads", "cache_length", "head_dim")}


def _dummy(cfg):
    return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)


def boxed_params(cfg: DecoderConfig, rng=None) -> Any:
    """Parameters with their logical-axis metadata (abstract shapes when rng is None)."""
    init = lambda key: Decoder(cfg).init(key, *_dummy(cfg))["params"]
    return jax.eval_shape(init, jax.random.key(0)) if rng is None else init(rng)


def init_params(cfg: DecoderConfig, rng) -> Any:
    return nn.unbox(boxed_params(cfg, rng))


def logical_axes(cfg: DecoderConfig) -> Any:
    """Pytree (like the params) of PartitionSpecs holding logical axis names."""
    return nn.get_partition_spec(boxed_params(cfg))


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
