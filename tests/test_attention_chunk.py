"""Query-blocked training attention (`DecoderConfig.attn_chunk`, with or without `attn_sparse`)
equals the one-block form (itself checked against transformers in test_qwen_parity.py): logits
and gradients, on packed rows whose segments must not see each other."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarl_jax.models import presets, qwen


@pytest.mark.parametrize("chunk,sparse", [(16, False), (16, True), (8, True)])
def test_chunked_attention_matches_full_forward_and_grad(chunk, sparse):
    cfg = dataclasses.replace(presets.get("micro"), num_layers=2)
    chunked = dataclasses.replace(cfg, attn_chunk=chunk, attn_sparse=sparse)
    params = qwen.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (3, 64)), jnp.int32)
    # Row 0: segments of 20, 30 and 14 tokens (boundaries inside blocks); row 1: 50 + padding;
    # row 2: short segments, then one spanning blocks (the sparse form skips most pairs here).
    seg = np.zeros((3, 64), np.int32)
    pos = np.zeros((3, 64), np.int32)
    for r, lens in enumerate(([20, 30, 14], [50], [5, 3, 40])):
        start = 0
        for i, n in enumerate(lens, 1):
            seg[r, start:start + n], pos[r, start:start + n] = i, np.arange(n)
            start += n
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)

    def loss(p, c):
        h, _ = qwen.Decoder(c).apply({"params": p}, tokens, pos, seg)
        logits = qwen.Decoder(c).apply({"params": p}, h, method=qwen.Decoder.logits)
        return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., :7]), logits

    (l_full, logits_full), g_full = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    (l_chunk, logits_chunk), g_chunk = jax.value_and_grad(loss, has_aux=True)(params, chunked)
    real = np.asarray(seg) > 0   # padding's outputs are unused (the sparse form gives them 0)
    np.testing.assert_allclose(np.asarray(logits_chunk)[real], np.asarray(logits_full)[real], atol=1e-5)
    np.testing.assert_allclose(l_chunk, l_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Segment isolation holds in the blocked form too: changing segment 1 leaves segment 2 alone.
    other = tokens.at[0, :20].set(3)
    h1, _ = qwen.Decoder(chunked).apply({"params": params}, tokens, pos, seg)
    h2, _ = qwen.Decoder(chunked).apply({"params": params}, other, pos, seg)
    np.testing.assert_allclose(h1[0, 20:64], h2[0, 20:64], atol=1e-6)
    assert np.abs(np.asarray(h1[0, :20] - h2[0, :20])).max() > 1e-3
