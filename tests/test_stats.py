"""Intervals against scipy's own: Wilson (binomtest), the paired t interval (ttest_rel), and the
detectable difference against a simulation of the paired design it describes."""
import numpy as np
import pytest
from scipy import stats as sps

from tarl_jax import stats


@pytest.mark.parametrize("k, n", [(0, 64), (1, 64), (17, 64), (64, 64), (3, 8)])
def test_wilson_matches_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(stats.wilson(k, n), (ci.low, ci.high), atol=1e-9)


def test_paired_difference_matches_ttest_rel():
    rng = np.random.default_rng(0)
    before = (rng.random(64) < 0.3).astype(float)
    after = np.where(rng.random(64) < 0.3, 1.0, before)
    d = stats.paired_difference(before, after)
    ci = sps.ttest_rel(after, before).confidence_interval(0.95)
    np.testing.assert_allclose((d["low"], d["high"]), (ci.low, ci.high), atol=1e-9)
    assert d["diff"] == pytest.approx(after.mean() - before.mean())
    assert d["improved"] == int(((after - before) > 0).sum()) and d["worsened"] == 0
    same = stats.paired_difference(before, before)      # no spread: a point, not NaN
    assert same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError, match="equal 1-d"):
        stats.paired_difference([1, 0], [1])


def test_detectable_difference_has_the_power_it_claims():
    """Simulate the paired experiment at the claimed difference: the t interval excludes 0 in
    about 80% of runs (the stated power), and far less often at half the difference."""
    n, p = 64, 0.25
    mdd = stats.detectable_difference(n, p)
    rng = np.random.default_rng(1)

    def power(delta, runs=2000):
        hits = 0
        for _ in range(runs):
            before = rng.random(n) < p
            after = rng.random(n) < p + delta   # independent outcomes: the default's assumption
            hits += stats.paired_difference(before, after)["low"] > 0
        return hits / runs

    assert 0.7 < power(mdd) < 0.9
    assert power(mdd / 2) < 0.45


def test_cluster_bootstrap_matches_scipy_on_one_seed_and_widens_with_seed_spread():
    rng = np.random.default_rng(3)
    x = (rng.uniform(size=(1, 64)) < 0.3).astype(float)
    lo, hi, se = stats.cluster_bootstrap(x, reps=20000)
    ref = sps.bootstrap((x[0],), np.mean, n_resamples=20000, method="percentile", random_state=1)
    assert abs(lo - ref.confidence_interval.low) <= 1 / 64 and abs(hi - ref.confidence_interval.high) <= 1 / 64
    np.testing.assert_allclose(se, ref.standard_error, rtol=0.05)
    # Three identical seeds say what one says; three that disagree by a seed-wide shift are
    # wider than the tasks alone would say.
    same = np.repeat(x, 3, axis=0)
    np.testing.assert_allclose(stats.cluster_bootstrap(same)[2], se, rtol=0.05)
    shifted = np.clip(same + np.array([[0.0], [0.5], [-0.3]]), 0, 1)
    assert stats.cluster_bootstrap(shifted)[2] > 2 * stats.cluster_bootstrap(same)[2]
    assert stats.cluster_bootstrap(x)[:2] == stats.cluster_bootstrap(x)[:2]   # seeded
    with pytest.raises(ValueError, match="seeds, tasks"):
        stats.cluster_bootstrap(np.zeros(5))
