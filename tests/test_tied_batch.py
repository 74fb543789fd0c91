"""A step whose groups all tie (every advantage 0) is skipped on the host: no forward or backward
is computed, params and optimizer stay put, the step still counts."""
import pathlib

import jax
import numpy as np

from tarl_jax import configlib, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_an_all_tied_batch_never_reaches_the_device_step(tmp_path):
    c = configlib.load(str(REPO / "configs" / "tiny.py"), "runlocal,judge=none")
    c.model.preset, c.warmstart.steps = "micro", 0   # an untrained policy: every episode fails
    t = trainer.Trainer(c, str(tmp_path))
    state, _ = t.init_or_restore()
    before = jax.device_get(state)

    def refuse(*a, **k):
        raise AssertionError("the device step ran on a batch without signal")

    t.train_step = refuse
    state, m = t.rl_step(state, 0)
    assert m["outcome"] == 0.0 and m["skipped"] == 1.0 and "grad_norm" not in m
    after = jax.device_get(state)
    assert int(after["step"]) == int(before["step"]) + 1
    for a, b in zip(jax.tree.leaves((before["params"], before["opt_state"])),
                    jax.tree.leaves((after["params"], after["opt_state"]))):
        np.testing.assert_array_equal(a, b)
    # what counts as signal: a non-zero advantage on a token the loss trains on
    mask = np.array([[0, 1, 1, 0]], np.int32)
    for adv, want in (([0, 0, 0, 0], False), ([3, 0, 0, -1], False), ([0, 0, 0.5, 0], True)):
        assert t._has_signal({"advantages": np.array([adv], np.float32), "loss_mask": mask}) is want
    c.rl.skip_no_signal = False
    assert t._has_signal({"advantages": np.zeros((1, 4), np.float32), "loss_mask": mask})
