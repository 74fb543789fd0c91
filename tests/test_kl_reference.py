"""The KL reference policy (rl.kl_coef > 0): it is the policy RL starts from, i.e. after the
warm start, not the random init; the KL term starts at ~0 and grows once the policy moves; and a
run restarted from its checkpoint anchors to bit-identical weights."""
import pathlib

import jax
import numpy as np
import pytest

from tarl_jax import configlib, trainer
from tarl_jax.rl import batch as batch_lib
from tarl_jax.rl import checkpoint as ckpt_lib
from tarl_jax.rl import step as step_lib

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def kl_config():
    c = configlib.load(TINY, "runlocal")
    c.model.preset = "micro"
    c.rl.kl_coef = 0.1
    c.total_steps, c.checkpoint_every, c.eval_every = 2, 1, 2
    c.save_episodes = False
    c.world.max_steps, c.rollout.max_turn_tokens = 3, 16   # short rollouts: the test is the KL
    return c


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def identical(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step run, then a second trainer restarted from its last checkpoint."""
    workdir = tmp_path_factory.mktemp("kl_run")
    t = trainer.Trainer(kl_config(), str(workdir))
    with pytest.MonkeyPatch.context() as mp:
        # A barely trained micro model fails every episode alike: equal rewards, zero GRPO
        # advantages, no update. Fixed +-1 advantages make the first update surely move the
        # policy; what is under test is the reference, not the rewards.
        mp.setattr(batch_lib, "episode_advantages",
                   lambda config, rewards, *_: np.where(np.arange(len(rewards)) % 2, -1.0, 1.0))
        _, meta = t.run()
    again = trainer.Trainer(kl_config(), str(workdir))
    random_init = leaves(again._initial_params)   # before anything can donate its buffers
    state, _ = again.init_or_restore()
    return workdir, t, meta, again, random_init, state


def test_reference_is_the_warm_started_policy(runs):
    workdir, t, meta, again, random_init, _ = runs
    assert meta["warmstart"]["expert_solved"] > 0
    # An independent warm start from the same random init reproduces the reference exactly ...
    warm, _ = again.warm_start(again._initial_params)
    assert identical(t.ref_params["policy"], warm)
    # ... and it is not the random init the warm start began from.
    assert not identical(t.ref_params["policy"], random_init)
    # The step-0 checkpoint (the policy RL started from) holds the same weights, and the train
    # step's buffer donation left the in-memory reference intact over the RL steps.
    abstract = jax.eval_shape(lambda: step_lib.init_state(warm, t.optimizer, t.model_cfg, t.ppo,
                                                          t.state_sh))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            abstract, t.state_sh)
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"))
    try:
        step0, _ = ckpt.restore(abstract, step=0)
    finally:
        ckpt.close()
    assert identical(t.ref_params["policy"], step0["params"]["policy"])


def test_kl_is_zero_at_the_start_and_grows_after_an_update(runs):
    first, second = runs[2]["history"]
    assert abs(first["kl"]) < 1e-6          # policy == reference at the first update
    assert first["grad_norm"] > 1e-3        # the first update moved the policy ...
    assert second["kl"] > 1e-6              # ... so the second sees a positive KL


def test_restart_restores_a_bit_identical_reference(runs):
    _, t, _, again, _, state = runs
    assert int(jax.device_get(state["step"])) == 2          # resumed, not re-initialised
    assert identical(again.ref_params, t.ref_params)
    assert not identical(again.ref_params["policy"], state["params"]["policy"])  # the policy moved on
