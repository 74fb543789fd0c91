"""An evaluation's figures and the run summary: the headline over tasks that need a write, and
pass^1 per request kind (computed here again with numpy from the same trials)."""
import pathlib

import numpy as np

from tarl_jax import configlib, components, metrics
from tarl_jax.sandbox import domains

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
REWARDS = {"a": [1.0], "b": [0.0], "c": [1.0], "d": [0.0], "e": [1.0], "f": [0.0]}
KINDS = {"a": "cancel", "b": "cancel", "c": "cancel", "d": "return", "e": "none", "f": "return"}
WRITES = {t for t, k in KINDS.items() if k != "none"}


def test_pass_1_per_kind_is_the_mean_success_of_that_kinds_tasks():
    out = metrics.eval_figures(REWARDS, WRITES, KINDS)
    for kind in set(KINDS.values()):
        ids = [t for t in REWARDS if KINDS[t] == kind]
        assert out[f"tasks/kind/{kind}"] == len(ids)
        assert np.isclose(out[f"pass^1/kind/{kind}"], np.mean([REWARDS[t][0] == 1.0 for t in ids]))
    assert np.isclose(out["pass^1/writes"], 2 / 5)         # the headline is unchanged by kinds
    assert not any(k.startswith("pass^1/kind/") for k in metrics.eval_figures(REWARDS, WRITES))


def test_the_summary_reports_each_kind_before_and_after():
    before = metrics.eval_figures(REWARDS, WRITES, KINDS)
    after = metrics.eval_figures({**REWARDS, "d": [1.0]}, WRITES, KINDS)
    text = metrics.summary({"evals": [{"step": 0, **before}, {"step": 5, **after}]},
                           pathlib.Path("."))
    line = next(x for x in text.splitlines() if x.startswith("by request kind"))
    assert "cancel (3) 0.67 -> 0.67" in line and "return (2) 0.00 -> 0.50" in line
    one = metrics.eval_figures(REWARDS, set(REWARDS), dict.fromkeys(REWARDS, "cancel"))
    one_kind = metrics.summary({"evals": [{"step": 0, **one}, {"step": 5, **one}]}, pathlib.Path("."))
    assert "by request kind" not in one_kind      # one kind: the headline says it all


def test_level_1_tasks_are_one_request_of_four_kinds():
    """The synthetic level-1 world's kinds as the trainer names them (gold writes' tools):
    every validation task is one of the four requests its brief describes."""
    c = configlib.load(TINY, "level=1,compact,tune")
    kinds = {metrics.request_kind(domains.gold_writes(t)) for t in components.build_world(c).eval}
    assert kinds == {"cancel_pending_order", "modify_pending_order_payment",
                     "modify_pending_order_address", "return_delivered_order_items"}
