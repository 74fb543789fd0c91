"""Packing: round trip, masks, segment isolation, overflow rules, buckets, value scattering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarl_jax.rl import advantages as adv
from tarl_jax.rl import pack as P
from tarl_jax.sandbox.record import AgentTurn, EnvTurn, Episode


def make_episode(rng, n_turns, max_prompt=6, max_gen=5, first_prompt=3):
    turns = []
    for k in range(n_turns):
        n_prompt = first_prompt if k == 0 else int(rng.integers(1, max_prompt))
        n_gen = int(rng.integers(1, max_gen))
        turns.append(AgentTurn(
            index=k, message={"role": "assistant", "content": f"t{k}"},
            prompt_ids=rng.integers(100, 200, n_prompt).tolist(),       # rendered context
            token_ids=rng.integers(1000, 2000, n_gen).tolist(),         # generated
            logprobs=(-rng.random(n_gen)).tolist()))
        turns.append(EnvTurn("user", [{"role": "user", "content": "ok"}]))
    return Episode(task_id=f"t{rng.integers(1e6)}", domain="retail", turns=turns, reward=1.0)


def episodes(seed=0, n=7):
    rng = np.random.default_rng(seed)
    return [make_episode(rng, int(rng.integers(1, 4))) for _ in range(n)]


def stream(ep):
    return np.array([x for t in ep.agent_turns for x in t.prompt_ids + t.token_ids])


def generated(ep):
    """Per stream token: its agent-turn index if the policy generated it, else -1."""
    return np.array([x for t in ep.agent_turns
                     for x in [-1] * len(t.prompt_ids) + [t.index] * len(t.token_ids)])


SHAPE = dict(seq_lens=(16, 32, 64), rows=(1, 2, 4, 8))


def test_round_trip_and_layout():
    eps = episodes()
    p = P.pack(eps, **SHAPE)
    a = p.arrays
    assert all(v.shape == (p.stats["rows"], p.stats["seq_len"]) for k, v in a.items()
               if k != "policy_index")
    assert a["policy_index"].shape[0] == p.stats["rows"]
    for i, ep in enumerate(eps):
        r, start, n = p.spans[i]
        s = stream(ep)
        assert n == len(s)
        np.testing.assert_array_equal(a["tokens"][r, start:start + n], s)   # exact record ids
        np.testing.assert_array_equal(a["positions"][r, start:start + n], np.arange(n))
        assert np.all(a["episode"][r, start:start + n] == i)
    for i, ep in enumerate(eps):
        s = stream(ep)
        np.testing.assert_array_equal(P.unpack(p, a["targets"])[i][1:], s[1:])
        lp = np.array([x for t in ep.agent_turns for x in [0.0] * len(t.prompt_ids) + t.logprobs])
        np.testing.assert_allclose(P.unpack(p, a["logprobs"])[i][1:], lp[1:], rtol=1e-6)
    assert p.stats["policy_tokens"] == sum(len(t.token_ids) for ep in eps for t in ep.agent_turns)


def test_mask_covers_exactly_the_generated_tokens():
    eps = episodes(1)
    p = P.pack(eps, **SHAPE)
    mask, turn = P.unpack(p, p.arrays["loss_mask"]), P.unpack(p, p.arrays["turn"], fill=-1)
    for i, ep in enumerate(eps):
        gen = generated(ep)
        np.testing.assert_array_equal(mask[i][1:], gen[1:] >= 0)
        np.testing.assert_array_equal(turn[i], gen)
        targets = p.arrays["targets"][p.arrays["loss_mask"] & (p.arrays["episode"] == i)]
        np.testing.assert_array_equal(targets, [x for t in ep.agent_turns for x in t.token_ids])


def test_segments_never_mix():
    p = P.pack(episodes(2, n=12), seq_lens=(32,), rows=(8,))
    a = p.arrays
    assert p.stats["rows_used"] < 12   # several episodes share rows
    for r in range(a["tokens"].shape[0]):
        seg = a["segment_ids"][r]
        k = seg.max()
        used = seg[seg > 0]
        # contiguous blocks 1, 2, ..., k, then only padding
        np.testing.assert_array_equal(np.unique(used), np.arange(1, k + 1))
        assert np.all(np.diff(used) >= 0) and np.all(seg[len(used):] == 0)
        for s in range(1, k + 1):
            idx = np.nonzero(seg == s)[0]
            assert len(np.unique(a["episode"][r, idx])) == 1
            np.testing.assert_array_equal(a["positions"][r, idx], np.arange(len(idx)))
            # the segment's last position predicts nothing (the next token is another episode's)
            assert a["targets"][r, idx[-1]] == 0 and not a["loss_mask"][r, idx[-1]]
        assert np.all(a["episode"][r, seg == 0] == -1) and not a["loss_mask"][r, seg == 0].any()


def tiny_attention(tokens, positions, segment_ids):
    """One causal self-attention layer masked by segment ids, positions as in RoPE-less models
    (an added embedding): a stand-in for the model until its own logits test."""
    rng = np.random.default_rng(0)
    emb, pos = (jnp.asarray(rng.normal(size=(n, 8)), jnp.float32) for n in (2000, 64))
    x = emb[tokens] + pos[positions]
    q, k, v = (x @ jnp.asarray(rng.normal(size=(8, 8)), jnp.float32) for _ in range(3))
    t = tokens.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    scores = jnp.where(causal & same, q @ jnp.swapaxes(k, 1, 2), -1e9)
    return jax.nn.softmax(scores, axis=-1) @ v


def alone(p, arrays, n_eps):
    """Each episode's segment copied to the start of a row of its own (padding after it)."""
    out = {k: np.zeros((n_eps,) + v.shape[1:], v.dtype) for k, v in arrays.items()}
    for i, (r, start, n) in enumerate(p.spans):
        for k in out:
            out[k][i, :n] = arrays[k][r, start:start + n]
    return out


def test_packed_attention_equals_each_episode_alone():
    eps = episodes(3, n=6)
    p = P.pack(eps, seq_lens=(64,), rows=(4,))
    assert p.stats["rows_used"] < len(eps)
    attend = jax.jit(tiny_attention)
    packed = np.asarray(attend(p.arrays["tokens"], p.arrays["positions"], p.arrays["segment_ids"]))
    single = alone(p, {"tokens": p.arrays["tokens"], "out": packed}, len(eps))
    n = [len(stream(ep)) for ep in eps]
    seg = (np.arange(64) < np.array(n)[:, None]).astype(np.int32)
    want = np.asarray(attend(single["tokens"], np.where(seg, np.arange(64), 0), seg))
    for i in range(len(eps)):
        np.testing.assert_allclose(single["out"][i, :n[i]], want[i, :n[i]], rtol=1e-5, atol=1e-5)


def long_episode():
    turn = lambda k, n_prompt, n_gen: AgentTurn(k, {}, list(range(n_prompt)),  # noqa: E731
                                                list(range(50, 50 + n_gen)), [-0.5] * n_gen)
    return Episode("long", "retail", turns=[turn(0, 4, 6), turn(1, 3, 7), turn(2, 2, 3)])  # 25


def test_truncate_keeps_prefix_and_counts():
    rng = np.random.default_rng(4)
    eps = [long_episode()] + [make_episode(rng, 1) for _ in range(2)]   # 25, <= 7, <= 7 tokens
    p = P.pack(eps, seq_lens=(8, 16), rows=(2, 4), overflow="truncate")
    r, start, n = p.spans[0]
    assert n == 16
    np.testing.assert_array_equal(p.arrays["tokens"][r, start:start + n], stream(eps[0])[:16])
    assert p.stats["truncated"] == 1 and p.stats["dropped"] == 0 and p.stats["tokens_lost"] == 9
    # turn 1 keeps 3 of its 7 generated tokens, turn 2 is gone
    np.testing.assert_array_equal(P.unpack(p, p.arrays["turn"], fill=-1)[0], generated(eps[0])[:16])


def test_drop_counts_and_leaves_no_trace():
    rng = np.random.default_rng(4)
    eps = [long_episode()] + [make_episode(rng, 1) for _ in range(2)]   # 25, <= 7, <= 7 tokens
    p = P.pack(eps, seq_lens=(8, 16), rows=(2, 4), overflow="drop")
    assert p.stats["dropped"] == 1 and p.stats["truncated"] == 0 and p.stats["tokens_lost"] == 25
    assert tuple(p.spans[0]) == (-1, -1, -1) and P.unpack(p, p.arrays["tokens"])[0] is None
    assert not np.any(p.arrays["episode"] == 0)
    with pytest.raises(ValueError, match="overflow"):
        P.pack(eps, seq_lens=(16,), rows=(4,), overflow="wrap")


def test_bucket_choice_least_padding_and_errors():
    assert P.first_fit_decreasing([5, 9, 3, 7], 12) == [[1, 2], [3, 0]]
    # lengths 12, 10, 9: T=16 needs 3 rows -> 4 (64 slots); T=32 holds all in 1 row (32 slots)
    t, rows, bins = P.choose_shape([12, 10, 9], seq_lens=(8, 16, 32), rows=(1, 2, 4))
    assert (t, rows) == (32, 1) and sorted(sum(bins, [])) == [0, 1, 2]
    assert P.choose_shape([12, 10, 9], seq_lens=(16, 32), rows=(4,))[:2] == (16, 4)  # tie: short T
    p = P.pack(episodes(5, n=3), seq_lens=(64,), rows=(2, 4))
    assert p.stats["rows"] == 2 and p.stats["rows_used"] == 1
    assert p.arrays["tokens"].shape == (2, 64)
    with pytest.raises(ValueError, match="rows"):
        P.choose_shape([10] * 5, seq_lens=(16,), rows=(1, 2))


def test_missing_logprobs_are_nan_and_counted():
    ep = long_episode()
    ep.turns[1].logprobs = None
    p = P.pack([ep], seq_lens=(32,), rows=(1,))
    lp = P.unpack(p, p.arrays["logprobs"])[0]
    gen = generated(ep)
    assert np.all(np.isnan(lp[gen == 1])) and not np.any(np.isnan(lp[gen != 1]))
    assert p.stats["turns_without_logprobs"] == 1
    ep.turns[0].token_ids = None
    with pytest.raises(ValueError, match="turn 0"):
        P.pack([ep], seq_lens=(32,), rows=(1,))


def test_per_turn_advantages_land_on_their_turns():
    eps = episodes(6, n=8)
    k = max(len(ep.agent_turns) for ep in eps)
    turn_mask = np.arange(k)[None] < np.array([len(ep.agent_turns) for ep in eps])[:, None]
    rewards = np.where(turn_mask, np.random.default_rng(0).normal(size=turn_mask.shape), 0)
    a = np.asarray(adv.compute_advantages("rloo", rewards, np.repeat([0, 1], 4),
                                          credit="per_turn", turn_mask=turn_mask))
    p = P.pack(eps, a, **SHAPE)
    for i, (ep, got) in enumerate(zip(eps, P.unpack(p, p.arrays["advantages"]))):
        gen = generated(ep)
        np.testing.assert_allclose(got, np.where(gen >= 0, a[i, np.maximum(gen, 0)], 0))
    traj = np.arange(8, dtype=np.float32)
    p = P.pack(eps, traj, **SHAPE)
    for i, (ep, got) in enumerate(zip(eps, P.unpack(p, p.arrays["advantages"]))):
        np.testing.assert_array_equal(got[1:], np.where(generated(ep)[1:] >= 0, traj[i], 0))


def test_last_token_rewards_and_packed_gae():
    """Token rewards sum to each episode's return (also when truncation cut turns away), and
    GAE over packed rows equals GAE of every episode alone."""
    eps = [long_episode()] + episodes(7, n=5)
    per_turn = np.zeros((6, 3), np.float32)
    for i, ep in enumerate(eps):
        per_turn[i, :len(ep.agent_turns)] = np.arange(1, len(ep.agent_turns) + 1)
    p = P.pack(eps, seq_lens=(20,), rows=(4, 8), overflow="truncate")   # cuts turn 2 of eps[0]
    r = P.scatter_turn_values(p.arrays, per_turn, at="last")
    for i, got in enumerate(P.unpack(p, r)):
        assert got.sum() == pytest.approx(per_turn[i].sum())
        assert np.count_nonzero(got) == min(len(eps[i].agent_turns), int(p.arrays["turn"][
            p.arrays["episode"] == i].max()) + 1)
    r_traj = P.scatter_turn_values(p.arrays, per_turn.sum(1), at="last")
    assert all(np.count_nonzero(x) == 1 for x in P.unpack(p, r_traj))
    values = np.random.default_rng(1).normal(size=r.shape).astype(np.float32)
    packed_adv, _ = adv.gae(r, values, p.arrays["loss_mask"], p.arrays["segment_ids"], 0.9, 0.8)
    single = alone(p, {"r": r, "v": values, "m": p.arrays["loss_mask"],
                       "a": np.asarray(packed_adv)}, len(eps))
    alone_adv, _ = adv.gae(single["r"], single["v"], single["m"], None, 0.9, 0.8)
    np.testing.assert_allclose(single["a"], alone_adv, atol=1e-5)


def test_policy_index_lists_each_rows_mask_positions():
    mask = np.zeros((3, 40), bool)
    mask[0, [3, 4, 5, 30]] = True
    mask[2, 10:31] = True          # 21 positions -> width 24 (1.5 x 16)
    idx = P.policy_index(mask)
    assert idx.shape == (3, 24)
    for r in range(3):
        got = idx[r][idx[r] < 40]
        np.testing.assert_array_equal(got, np.flatnonzero(mask[r]))
        assert (idx[r][len(got):] == 40).all()
    # widths: the smallest of 16, 24, 32, 48, 64, ... that holds the longest row, capped at T
    for n, width in ((1, 16), (16, 16), (17, 24), (24, 24), (25, 32), (33, 48), (49, 64)):
        m = np.zeros((2, 100), bool)
        m[1, :n] = True
        assert P.policy_index(m).shape == (2, width), n
    assert P.policy_index(np.ones((1, 40), bool)).shape == (1, 40)
