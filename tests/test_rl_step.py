"""The jitted train step: log-probs, accumulation, PPO critic, 8-device sharding == 1 device."""
import dataclasses
import textwrap

import jax
import numpy as np
import pytest

from tarl_jax import sharding
from tarl_jax.models import qwen
from tarl_jax.rl import losses
from tarl_jax.rl import step as S

CFG = qwen.DecoderConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=8, num_kv_heads=4, head_dim=8, qk_norm=True)


def make_batch(rows=4, t=16, seed=0, duplicate=False):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, CFG.vocab_size, (rows, t)).astype(np.int32)
    adv = rng.normal(size=(rows, t)).astype(np.float32)
    if duplicate:  # two identical halves: each microbatch holds the same tokens
        toks[rows // 2:], adv[rows // 2:] = toks[:rows // 2], adv[:rows // 2]
    seg = np.ones((rows, t), np.int32)
    seg[0, t // 2:] = 2  # two episodes share row 0
    seg[rows // 2, t // 2:] = 2
    pos = np.where(seg == 2, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)
    nxt = np.concatenate([toks[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    last = np.concatenate([seg[:, 1:] != seg[:, :-1], np.ones((rows, 1), bool)], 1)
    mask = ~last & (rng.random((rows, t)) < 0.7)
    if duplicate:
        mask[rows // 2:] = mask[:rows // 2]
    return dict(tokens=toks, positions=pos, segment_ids=seg, targets=np.where(last, 0, nxt),
                loss_mask=mask, advantages=np.where(mask, adv, 0), logprobs=np.zeros_like(adv),
                ref_logprobs=np.zeros_like(adv), token_rewards=np.where(mask, adv, 0),
                values=np.zeros_like(adv))


def run(ppo, microbatches, steps=1, mesh=None, policy_loss="ppo", batch=None, lr=1e-2,
        gather=False):
    mesh = mesh or sharding.make_mesh()
    opt = S.make_optimizer(lr, critic_lr=lr if ppo else None)
    sh = S.state_shardings(CFG, opt, ppo, mesh)
    state = S.init_state(qwen.init_params(CFG, jax.random.key(0)), opt, CFG, ppo, sh)
    keys = S.BATCH_KEYS + (S.PPO_KEYS if ppo else ()) + (S.GATHER_KEYS if gather else ())
    sc = S.StepConfig(loss=losses.LossConfig(policy_loss=policy_loss), ppo=ppo,
                      microbatches=microbatches, logprob_chunk=48)
    fn = S.jit_train_step(CFG, sc, opt, mesh, sh, keys)
    db = S.device_batch(batch or make_batch(), keys, mesh)
    history = []
    for i in range(steps):
        state, m = fn(state, db, jax.random.key(i))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def test_forward_logprobs_equal_full_log_softmax():
    params = {"policy": qwen.init_params(CFG, jax.random.key(1))}
    b = make_batch()
    logp, ent, _ = S.forward(CFG, params, b, S.StepConfig(logprob_chunk=48, temperature=0.7))
    model = qwen.Decoder(CFG)
    h, _ = model.apply({"params": params["policy"]}, b["tokens"], b["positions"], b["segment_ids"])
    full = jax.nn.log_softmax(model.apply({"params": params["policy"]}, h, method=qwen.Decoder.logits) / 0.7)
    ref = np.take_along_axis(np.asarray(full), b["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(logp, ref, atol=1e-5)
    np.testing.assert_allclose(ent, -(np.exp(full) * full).sum(-1), atol=1e-4)


def test_microbatch_accumulation_equals_full_batch():
    batch = make_batch(duplicate=True)
    # Adam's first step is ~lr * sign(g): a small lr keeps fp32 summation-order noise small.
    s1, h1 = run(False, 1, batch=batch, lr=1e-3)
    s2, h2 = run(False, 2, batch=batch, lr=1e-3)
    assert h1[0]["tokens"] == h2[0]["tokens"] > 0
    np.testing.assert_allclose(h1[0]["loss"], h2[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_step_counts_and_first_ratio_is_one():
    state, hist = run(False, 1, steps=2)
    assert int(state["step"]) == 2
    # Rollout log-probs of 0 vs real log-probs: ratio exp(logp) < 1 and clipping is active.
    assert hist[0]["ratio"] < 1.0


def test_ppo_critic_learns():
    _, hist = run(True, 1, steps=8, policy_loss="pg")
    assert hist[-1]["vf_loss"] < 0.8 * hist[0]["vf_loss"], [h["vf_loss"] for h in hist]


def test_bad_microbatch_count_is_reported():
    with pytest.raises(ValueError, match="not divisible by microbatches=3"):
        run(False, 3)


SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from tarl_jax import sharding
    import tests.test_rl_step as T
    assert len(jax.devices()) == 8
    for ppo in (False, True):
        ref, h_ref = T.run(ppo, 2, steps=2, lr=1e-3, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
        got, h_got = T.run(ppo, 2, steps=2, lr=1e-3, mesh=sharding.make_mesh({"fsdp": 2, "tensor": 4}))
        assert got["params"]["policy"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        d = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(got["params"])))
        dl = max(abs(a["loss"] - b["loss"]) for a, b in zip(h_ref, h_got))
        print("PPO", ppo, "max param diff", d, "loss diff", dl)
        assert d < 1e-5 and dl < 1e-5, (d, dl)
""")


def test_sharded_step_equals_single_device():
    from tests.devices import run_with_devices
    out = run_with_devices(SCRIPT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("max param diff") == 2


@pytest.mark.parametrize("ppo", [False, True])
def test_scoring_only_policy_positions_gives_the_same_update(ppo):
    """pack.policy_index: the step projects only loss-mask positions to the vocabulary; the
    update (params after 2 steps, every metric) equals scoring all positions."""
    from tarl_jax.rl import pack
    b = make_batch(t=64)
    b["loss_mask"] &= np.random.default_rng(1).random(b["loss_mask"].shape) < 0.4  # a dialogue
    full_batch = dict(b)
    b["policy_index"] = pack.policy_index(b["loss_mask"])
    assert b["policy_index"].shape[1] < 64          # really fewer positions
    full_state, full = run(ppo, 2, steps=2, batch=full_batch)
    gat_state, gat = run(ppo, 2, steps=2, batch=b, gather=True)
    for a, c in zip(full, gat):
        for k in a:
            assert abs(a[k] - c[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], c[k])
    # Adam divides by sqrt(v): where a gradient is ~0 its float rounding moves a parameter by
    # up to ~lr * 1e-3, hence 1e-4 on params while every metric agrees to 1e-5.
    for x, y in zip(jax.tree.leaves(full_state["params"]), jax.tree.leaves(gat_state["params"])):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_a_batch_without_signal_leaves_params_and_adam_alone():
    """All advantages 0 (every group tied): the step moves nothing, even after a real gradient
    filled Adam's momentum (which once replayed that gradient on every tied step after it)."""
    mesh = sharding.make_mesh()
    opt = S.make_optimizer(1e-2)
    sh = S.state_shardings(CFG, opt, False, mesh)
    state = S.init_state(qwen.init_params(CFG, jax.random.key(0)), opt, CFG, False, sh)
    fn = S.jit_train_step(CFG, S.StepConfig(logprob_chunk=48), opt, mesh, sh, S.BATCH_KEYS)
    real = make_batch()
    state, m = fn(state, S.device_batch(real, S.BATCH_KEYS, mesh), jax.random.key(0))
    assert float(m["skipped"]) == 0.0
    before = jax.device_get(state)
    tied = dict(real, advantages=np.zeros_like(real["advantages"]))
    state, m = fn(state, S.device_batch(tied, S.BATCH_KEYS, mesh), jax.random.key(1))
    after = jax.device_get(state)
    assert float(m["skipped"]) == 1.0 and float(m["grad_norm"]) == 0.0
    assert int(after["step"]) == int(before["step"]) + 1
    for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                    jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ppo", [False, True])
def test_a_non_finite_batch_is_never_applied(ppo):
    """A NaN advantage (or anything that makes the loss or a gradient non-finite) leaves params
    and optimizer state exactly as they were and says so (once trained on, NaN ends the run)."""
    mesh = sharding.make_mesh()
    opt = S.make_optimizer(1e-2, critic_lr=1e-2 if ppo else None)
    sh = S.state_shardings(CFG, opt, ppo, mesh)
    state = S.init_state(qwen.init_params(CFG, jax.random.key(0)), opt, CFG, ppo, sh)
    keys = S.BATCH_KEYS + (S.PPO_KEYS if ppo else ())
    fn = S.jit_train_step(CFG, S.StepConfig(logprob_chunk=48, ppo=ppo), opt, mesh, sh, keys)
    real = make_batch()
    state, m = fn(state, S.device_batch(real, keys, mesh), jax.random.key(0))
    assert float(m["nonfinite"]) == 0.0
    before = jax.device_get(state)
    bad = dict(real, advantages=real["advantages"].copy(), token_rewards=real["token_rewards"].copy())
    bad["advantages"][0, 1] = bad["token_rewards"][0, 1] = np.nan
    bad["loss_mask"] = real["loss_mask"].copy()
    bad["loss_mask"][0, 1] = True
    state, m = fn(state, S.device_batch(bad, keys, mesh), jax.random.key(1))
    after = jax.device_get(state)
    assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                    jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"])):
        np.testing.assert_array_equal(a, b)
    state, m = fn(state, S.device_batch(real, keys, mesh), jax.random.key(2))
    assert float(m["nonfinite"]) == 0.0                   # and the next good batch trains


def test_ppo_critic_lambda_is_decoupled_from_the_actors():
    """The critic's targets use critic_lam, the actor's advantages lam: with the same batch,
    changing critic_lam changes the value loss and nothing of the policy loss."""
    params = {"policy": qwen.init_params(CFG, jax.random.key(0)),
              "value": {"w": jax.random.normal(jax.random.key(1), (CFG.hidden_size,)),
                        "b": np.float32(0.3)}}
    b = make_batch()
    b["values"] = np.random.default_rng(2).normal(size=b["values"].shape).astype(np.float32)
    out = {}
    for lam in (1.0, 0.5):
        cfg = S.StepConfig(ppo=True, lam=1.0, critic_lam=lam, logprob_chunk=48)
        _, out[lam] = S._loss(params, b, CFG, cfg)
    assert float(out[1.0]["pg_loss"]) == float(out[0.5]["pg_loss"])
    assert float(out[1.0]["vf_loss"]) != float(out[0.5]["vf_loss"])


def test_step_config_from_the_run_config():
    """Greedy rollouts score at temperature 1 (as the sampler reports greedy rows), not 1/0;
    dr_grpo brings its constant normaliser; PPO's actor lambda is 1."""
    import pathlib

    from tarl_jax import configlib
    from tarl_jax.rl import batch as batch_lib
    tiny = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    c = configlib.load(tiny, "algo=dr_grpo")
    c.rollout.temperature = 0.0
    sc = batch_lib.step_config(c)
    assert sc.temperature == 1.0 and sc.lam == 1.0 and sc.skip_no_signal
    assert sc.loss.agg == "token_sum_norm"
    assert sc.loss.max_len == c.rollout.max_turn_tokens * c.world.max_steps
    # agg "" is the algorithm's own (level 0 chooses seq_mean for GRPO: configs/tiny.py)
    assert batch_lib.step_config(configlib.load(tiny, "algo=grpo,level=1")).loss.agg == "token_mean"
    assert batch_lib.step_config(configlib.load(tiny, "algo=grpo")).loss.agg == "seq_mean"
    c.rl.agg = "seq_mean"   # an explicit choice stands
    assert batch_lib.step_config(c).loss.agg == "seq_mean"
    params = {"policy": qwen.init_params(CFG, jax.random.key(0))}
    logp, _, _ = S.forward(CFG, params, make_batch(), dataclasses.replace(sc, logprob_chunk=48))
    assert np.isfinite(np.asarray(logp)).all()
    c.rollout.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        batch_lib.step_config(c)
