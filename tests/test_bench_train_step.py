"""bench/train_step.py: its batch recipe (ours and tunix's views of one batch agree), mesh
parsing, and a one-step run of our side whose loss is checked against a numpy GRPO loss."""
import dataclasses

import jax
import numpy as np
import pytest

from tarl_jax.bench import train_step as B
from tarl_jax.models import presets, qwen
from tarl_jax.rl import step as S

CFG = dataclasses.replace(presets.get("micro"), rope_theta=1e6)


@pytest.fixture(scope="module")
def batch():
    params = qwen.init_params(CFG, jax.random.key(0))
    ours, theirs = B.make_batch(CFG, rows=4, prompt=6, completion=8, group=2, seed=1)
    return params, ours, theirs


def test_both_views_of_the_batch_agree(batch):
    _, ours, theirs = batch
    for r in range(4):
        mask = ours["loss_mask"][r]
        # The targets our loss scores are exactly tunix's unpadded completion tokens.
        np.testing.assert_array_equal(ours["targets"][r][mask],
                                      theirs["completion_ids"][r][theirs["completion_mask"][r]])
        np.testing.assert_array_equal(ours["logprobs"][r][mask],
                                      theirs["old_logps"][r][theirs["completion_mask"][r]])
        assert np.all(ours["advantages"][r][mask] == theirs["advantages"][r])
    # Padding is its own segment (0), so attention skips it as tunix's pad mask does.
    assert np.all((ours["segment_ids"][:, 6:] == 0) == (theirs["completion_ids"] == B.PAD_ID))
    np.testing.assert_allclose(theirs["advantages"].reshape(2, 2).mean(1), 0, atol=1e-6)


def test_bad_arguments_are_reported():
    assert B.parse_mesh("fsdp=4+tensor=2") == {"fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="axis=size"):
        B.parse_mesh("fsdp4")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        B.parse_mesh("model=2")
    with pytest.raises(KeyError, match="unknown"):
        B.shape("huge")
    with pytest.raises(ValueError, match="multiple of group"):
        B.make_batch(CFG, rows=3, prompt=4, completion=4, group=2)


def numpy_grpo_loss(params, b):
    """Clipped GRPO + k3 KL, mean over each sequence's tokens then over sequences."""
    logp, _, _ = S.forward(CFG, {"policy": params}, b, B.STEP_CFG)
    logp, m, adv = np.asarray(logp, np.float64), b["loss_mask"], b["advantages"]
    ratio = np.exp(logp - b["logprobs"])
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - B.EPSILON, 1 + B.EPSILON))
    d = b["ref_logprobs"] - logp
    per_token = pg + B.KL_COEF * (np.exp(d) - d - 1)
    return np.mean((per_token * m).sum(1) / m.sum(1))


def test_one_step_of_our_side_computes_the_grpo_loss(batch):
    params, ours, _ = batch
    want = numpy_grpo_loss(params, ours)
    step = B.Ours(CFG, params, ours, {"data": 1})
    np.testing.assert_allclose(step.ready["loss"], want, rtol=1e-5, atol=1e-7)
    assert step.ready["grad_norm"] > 0
    assert set(step.step()) == {"wall", "cpu"}


class FakeOurs:
    """Stands in for the compiled step: this test is about the skip path and the table."""
    ready = {"first_s": 3.0, "loss": 0.25, "grad_norm": 1.5}

    def __init__(self, *args):
        pass

    def step(self):
        return {"wall": 0.5, "cpu": 0.4}

    def close(self):
        pass


def test_missing_tunix_venv_skips_with_the_setup_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(B.SHAPES, "micro", CFG)
    monkeypatch.setattr(B, "Ours", FakeOurs)
    lim = B.limits.Limits(matmul_f32=1e6, matmul_bf16=1e6, bandwidth=1e9, n=8, mb=1)
    monkeypatch.setattr(B.limits, "measure", lambda: lim)
    B.main(["--shapes", "micro", "--rows", "2", "--group", "2", "--prompt", "4",
            "--completion", "4", "--rounds", "2", "--meshes", "",
            "--tunix_venv", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert "tunix part skipped" in out and B.TUNIX_SETUP in out
    # 2 rows x 8 tokens / 0.5 s; compile = first step - best step.
    assert "| micro | 0.07M | 2 x (4 + 4) | 32 | skipped | - | 0.400 / - | - | 2.5 / - |" in out
    # against the machine: model FLOPs (at the positions a row scores) / 0.5 s / the peak
    scored = B.make_batch(CFG, 2, 4, 4, 2)[0]["policy_index"].shape[1]
    model, executed = B.aot.train_flops(CFG, 2, 8, scored)
    assert lim.line() in out
    assert (f"| micro | {model / 1e9:.3g} | {executed / 1e9:.3g} / nan | 0.500 | "
            f"{model / 0.5 / 1e9:.3g} | {model / 0.5 / 1e6:.1%} |") in out
