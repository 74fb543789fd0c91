"""Losses vs hand values and NumPy; chunked log-probs vs full logits (values and gradients)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarl_jax.rl import losses as L

B, T, D, V = 2, 5, 8, 37


def full_logprobs(hidden, w, targets, temperature=1.0):
    logp_all = jax.nn.log_softmax(hidden @ w / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def inputs(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32) * scale   # large logits: running max
    w = rng.normal(size=(D, V)).astype(np.float32)
    return jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)


# whole vocabulary, ragged last chunk, chunk > V; [D, V] and [V, D] weights.
@pytest.mark.parametrize("chunk, vocab_axis", [(37, 1), (8, 1), (16, 0), (100, 0)])
def test_chunked_logprobs_equal_full(chunk, vocab_axis):
    hidden, w, targets = inputs()
    weight = w if vocab_axis == 1 else w.T
    logp, ent = jax.jit(L.chunked_logprobs, static_argnums=(3, 4, 5))(
        hidden, weight, targets, chunk, vocab_axis, 0.7)
    want_logp, want_ent = full_logprobs(hidden, w, targets, 0.7)
    np.testing.assert_allclose(logp, want_logp, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5)


@pytest.mark.parametrize("vocab_axis", [1, 0])   # [D, V] weight; [V, D] (a tied embedding)
def test_chunked_logprobs_gradient_equals_full(vocab_axis):
    """Autodiff of the whole [B, T, V] log-softmax against the chunked scan with its own
    projection backward (losses._project)."""
    hidden, w, targets = inputs(1)
    coef = np.random.default_rng(9).normal(size=(2, B, T)).astype(np.float32)

    def objective(fn):
        def f(h, w):
            logp, ent = fn(h, w)
            return jnp.sum(coef[0] * logp + coef[1] * ent)
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    got = objective(lambda h, w: L.chunked_logprobs(h, w if vocab_axis else w.T, targets, 16,
                                                    vocab_axis))(hidden, w)
    want = objective(lambda h, w: full_logprobs(h, w, targets))(hidden, w)
    for g, r in zip(got, want):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def _largest_value(jaxpr) -> int:
    size = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            size = max(size, int(np.prod(getattr(var.aval, "shape", ()))))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    size = max(size, _largest_value(inner))
    return size


def test_chunked_logprobs_never_hold_all_logits_even_in_backward():
    hidden, w, targets = inputs()
    loss = lambda h, w: jnp.sum(L.chunked_logprobs(h, w, targets, 8)[0])  # noqa: E731
    biggest = _largest_value(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, w).jaxpr)
    assert biggest < B * T * V, biggest   # one [B, T, chunk] block, never all 5 of them
    assert biggest >= B * T * 8


CFG = L.LossConfig()


def batch(mask, adv, old, ref=None, seg=None):
    b = {"loss_mask": np.asarray(mask, bool), "advantages": np.asarray(adv, np.float32),
         "logprobs": np.asarray(old, np.float32)}
    b["ref_logprobs"] = np.zeros_like(b["logprobs"]) if ref is None else np.asarray(ref, np.float32)
    if seg is not None:
        b["segment_ids"] = np.asarray(seg, np.int32)
    return b


def test_ppo_clip_hand_values():
    # ratios 1.5, 1.5, 0.5, 0.5, 1.0 with advantages +1, -1, +1, -1, 2; clip 0.2 / 0.3.
    old = np.zeros((1, 5), np.float32)
    logp = jnp.log(jnp.array([[1.5, 1.5, 0.5, 0.5, 1.0]]))
    b = batch(np.ones((1, 5)), [[1, -1, 1, -1, 2]], old)
    cfg = L.LossConfig(clip_low=0.2, clip_high=0.3)
    loss, m = L.policy_loss(logp, b, cfg)
    # per token: -min(r A, clip(r) A): -1.3, +1.5, -0.5, +0.8, -2.0
    np.testing.assert_allclose(loss, np.mean([-1.3, 1.5, -0.5, 0.8, -2.0]), rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 2 / 5)   # tokens 0 and 3 take the clipped term
    np.testing.assert_allclose(m["ratio"], np.mean([1.5, 1.5, 0.5, 0.5, 1.0]), rtol=1e-6)


def test_ppo_gradient_equals_policy_gradient_on_policy():
    rng = np.random.default_rng(0)
    logp = jnp.asarray(-rng.random((2, 6)), jnp.float32)
    b = batch(rng.random((2, 6)) < 0.7, rng.normal(size=(2, 6)), logp)
    grads = {name: jax.grad(lambda x: L.policy_loss(x, b, dataclasses.replace(
        CFG, policy_loss=name))[0])(logp) for name in L.POLICY_LOSSES}
    np.testing.assert_allclose(grads["ppo"], grads["pg"], atol=1e-6)
    assert np.abs(grads["pg"]).sum() > 0


def test_kl_estimators_and_coefficient():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    ref = np.array([[-1.0, -1.0, -1.5]], np.float32)
    d = ref - np.asarray(logp)
    np.testing.assert_allclose(L.kl_k1(logp, ref), -d)
    np.testing.assert_allclose(L.kl_k3(logp, ref), np.exp(d) - d - 1, rtol=1e-6)
    assert float(L.kl_k3(logp, ref)[0, 0]) == 0.0 and np.all(np.asarray(L.kl_k3(logp, ref)) >= 0)
    b = batch(np.ones((1, 3)), np.zeros((1, 3)), logp, ref)
    for est, fn in L.KL_ESTIMATORS.items():
        cfg = L.LossConfig(kl_coef=0.1, kl_estimator=est)
        loss, m = L.policy_loss(logp, b, cfg)
        np.testing.assert_allclose(m["kl"], np.mean(fn(logp, ref)), rtol=1e-6)
        np.testing.assert_allclose(loss, m["pg_loss"] + 0.1 * m["kl"], rtol=1e-6)


def np_aggregate(x, mask, seg, mode, max_len):
    seqs = [(b, s) for b in range(x.shape[0]) for s in np.unique(seg[b])
            if mask[b][seg[b] == s].any()]
    if mode == "token_mean":
        return x[mask].mean()
    if mode == "seq_mean":
        return np.mean([x[b][(seg[b] == s) & mask[b]].mean() for b, s in seqs])
    return x[mask].sum() / (len(seqs) * max_len)


@pytest.mark.parametrize("mode", sorted(L.AGGREGATIONS))
def test_aggregation_matches_numpy_per_packed_segment(mode):
    rng = np.random.default_rng(2)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2]])   # row 1 seg 2: no mask
    mask = (rng.random(seg.shape) < 0.8) & (seg > 0)
    mask[1, 6:] = False
    x = rng.normal(size=seg.shape).astype(np.float32)
    got = L.aggregate(jnp.asarray(x), mask, mode, seg, max_len=10)
    np.testing.assert_allclose(got, np_aggregate(x, mask, seg, mode, 10), rtol=1e-5)


def test_seq_mean_weighs_sequences_not_tokens():
    x = np.array([[1.0, 1.0, 1.0, 4.0]], np.float32)
    seg, mask = np.array([[1, 1, 1, 2]]), np.ones((1, 4), bool)
    assert float(L.aggregate(x, mask, "seq_mean", seg)) == pytest.approx(2.5)
    assert float(L.aggregate(x, mask, "token_mean", seg)) == pytest.approx(7 / 4)
    with pytest.raises(ValueError, match="max_len"):
        L.aggregate(x, mask, "token_sum_norm", seg)


def test_value_loss_clipped_hand_values():
    old = np.array([[0.0, 0.0, 0.0]], np.float32)
    values = jnp.array([[1.0, -0.1, 0.5]])
    returns = np.array([[0.0, -1.0, 1.0]], np.float32)
    # V_clip = [0.2, -0.1, 0.2]; max of squared errors: [1.0, 0.81, 0.64] (token 2 clipped)
    loss, m = L.value_loss(values, old, returns, np.ones((1, 3), bool), CFG)
    np.testing.assert_allclose(loss, 0.5 * np.mean([1.0, 0.81, 0.64]), rtol=1e-6)
    np.testing.assert_allclose(m["vf_clip_frac"], 1 / 3, rtol=1e-6)


def test_policy_loss_jits_and_reports_entropy():
    hidden, w, targets = inputs()
    mask = np.ones((B, T), bool)
    b = batch(mask, np.ones((B, T)), np.zeros((B, T)))

    @jax.jit
    def step(hidden):
        logp, ent = L.chunked_logprobs(hidden, w, targets, 16)
        return L.policy_loss(logp, b, L.LossConfig(policy_loss="pg"), entropy=ent)

    loss, m = step(hidden)
    logp, ent = full_logprobs(hidden, w, targets)
    np.testing.assert_allclose(loss, -np.mean(logp), rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], np.mean(ent), rtol=1e-5)
    with pytest.raises(KeyError, match="ppo"):
        L.policy_loss(logp, b, L.LossConfig(policy_loss="grpo"))


def test_k3_is_clamped_as_verl_clamps_it():
    """A token the policy made near-impossible under the reference (log-ratio 60) costs at most
    10, with a bounded gradient, instead of exp(60)."""
    logp = jnp.array([[-70.0, -1.0, -0.5]])
    ref = jnp.array([[-10.0, -1.0, -5.5]])
    kl = np.asarray(L.kl_k3(logp, ref))
    assert kl[0, 0] == 10.0 and kl[0, 1] == 0.0
    np.testing.assert_allclose(kl[0, 2], np.exp(-5.0) + 5.0 - 1.0, rtol=1e-6)  # within: exact
    grad = np.asarray(jax.grad(lambda x: L.kl_k3(x, ref).sum())(logp))
    assert np.isfinite(grad).all() and np.abs(grad).max() <= 1.0
