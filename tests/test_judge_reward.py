"""TARL reward: hand-computed values, the bands of the docstring, per-turn sums."""
import math

import ml_collections
import pytest
from hypothesis import given, strategies as st

from tarl_jax.judge.reward import trajectory_reward, turn_rewards, weights


@pytest.mark.parametrize("scores, outcome, expected", [
    ([1, 1, 1], 1, 15.0),                 # perfect
    ([0, 0, 0, 0], 0, 0.0),
    ([-1], 0, -5.0),                      # the -1 turn is priced by w_neg only
    ([1, -1, 0, 1], 0, -5 + 5 / 4 * 2),   # others: 1 + 0 + 1
    ([1, 1, -1, 1, 1], 1, 10 - 5 + 5 / 5 * 4),
    ([0, 1], 1, 10 + 2.5),
    ([], 1, 10.0),                        # no agent turn: outcome only
])
def test_hand_computed(scores, outcome, expected):
    assert trajectory_reward(scores, outcome) == pytest.approx(expected)


def test_weights_from_configdict_and_dict():
    cfg = ml_collections.ConfigDict({"w_out": 1.0, "w_neg": 2.0, "w_pos": 4.0})
    # 1*1 - 2 + 4/3 * (1 + 0)
    assert trajectory_reward([1, -1, 0], 1, cfg) == pytest.approx(1 - 2 + 4 / 3)
    assert trajectory_reward([1, 1], 0, {"w_pos": 1.0}) == pytest.approx(1.0)  # others default
    assert weights(None) == {"w_out": 10.0, "w_neg": 5.0, "w_pos": 5.0}
    with pytest.raises(KeyError, match="w_bad"):
        weights({"w_bad": 1})


@pytest.mark.parametrize("scores", [[1, -1, -1], [2], [0, 0.5]])
def test_invalid_scores_rejected(scores):
    with pytest.raises(ValueError):
        trajectory_reward(scores, 0)
    with pytest.raises(ValueError):
        turn_rewards(scores, 0)


def test_turn_rewards_need_a_turn():
    with pytest.raises(ValueError, match="no agent turns"):
        turn_rewards([], 1)


def test_turn_rewards_hand_computed():
    # outcome share 10/4 each; -1 turn carries -5; others 5/4 * s
    assert turn_rewards([1, -1, 0, 1], 1) == pytest.approx([2.5 + 1.25, 2.5 - 5, 2.5, 2.5 + 1.25])


score_lists = st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n), st.integers(-1, n - 1)))


@given(score_lists, st.sampled_from([0, 1]))
def test_bands_and_sums(case, outcome):
    base, neg = case
    scores = list(base)
    if neg >= 0:
        scores[neg] = -1
    r = trajectory_reward(scores, outcome)
    band = {(0, True): (-5, 0), (0, False): (0, 5), (1, True): (5, 10), (1, False): (10, 15)}
    lo, hi = band[(outcome, neg >= 0)]
    assert lo <= r <= hi
    if neg >= 0:
        assert r < hi            # a -1 can never reach the next band up
    if outcome == 1 and neg < 0 and all(s == 1 for s in scores):
        assert r == pytest.approx(15)
    assert math.fsum(turn_rewards(scores, outcome)) == pytest.approx(r)
