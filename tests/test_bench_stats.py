"""The statistics of a comparison: interval coverage on synthetic data, exact tests on hand-computed cases."""

import math

import numpy as np
import pytest

from tokenprune.bench.stats import (
    Bootstrap,
    bootstrap_p_value,
    holm,
    mcnemar_exact,
    percentile_interval,
    rank_ranges,
    tiers,
    wilson_interval,
)


def _wilson_many(successes: np.ndarray, n: int, z: float = 1.959963984540054) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised copy of the formula, checked against ``wilson_interval`` below."""
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize(("rate", "n"), [(0.9, 300), (0.5, 50), (0.97, 300)])
def test_wilson_covers_a_known_rate_about_95_percent_of_the_time(rate, n):
    rng = np.random.default_rng(1)
    successes = rng.binomial(n, rate, size=1000)
    lo, hi = _wilson_many(successes, n)
    for k in (1, n // 2, n - 1):  # the vectorised copy is the function
        expected = _wilson_many(np.array([k]), n)
        assert wilson_interval(k, n) == pytest.approx((expected[0][0], expected[1][0]))
    coverage = float(((lo <= rate) & (rate <= hi)).mean())
    assert 0.93 <= coverage <= 0.97


def test_wilson_on_a_hand_computed_case():
    # 9 of 10: centre (0.9 + z^2/20) / (1 + z^2/10), Wilson (1927); 0.5958 .. 0.9821 (standard tables)
    lo, hi = wilson_interval(9, 10)
    assert lo == pytest.approx(0.5958, abs=1e-4) and hi == pytest.approx(0.9821, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0


def test_the_bootstrap_interval_of_a_score_covers_its_mean_about_95_percent_of_the_time():
    """1000 simulated runs of 100 examples (Beta(2, 5) scores, mean 2/7), 1000 resamples each, vectorised."""
    n, runs, resamples, mean = 100, 1000, 1000, 2 / 7
    rng = np.random.default_rng(2)
    data = rng.beta(2, 5, size=(runs, n))
    boot = Bootstrap.draw(n, resamples, seed=3)
    means = data @ boot.weights.T / n  # (runs, B): every run resampled with the same weights
    lo, hi = np.quantile(means, [0.025, 0.975], axis=1)
    coverage = float(((lo <= mean) & (mean <= hi)).mean())
    assert 0.93 <= coverage <= 0.97
    assert percentile_interval(means[0]) == pytest.approx((lo[0], hi[0]))


def test_the_bootstrap_is_reproducible_under_its_seed_and_differs_across_seeds_and_tasks():
    a = Bootstrap.draw(50, 200, seed=7, stream="task-a")
    assert np.array_equal(a.weights, Bootstrap.draw(50, 200, seed=7, stream="task-a").weights)
    assert not np.array_equal(a.weights, Bootstrap.draw(50, 200, seed=8, stream="task-a").weights)
    assert not np.array_equal(a.weights, Bootstrap.draw(50, 200, seed=7, stream="task-b").weights)
    assert a.resamples == 200 and np.all(a.weights.sum(axis=1) == 50)


def test_resampled_means_leave_missing_values_out():
    boot = Bootstrap(np.array([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [0.0, 1.0, 2.0]]))
    values = np.array([[1.0, 0.0, np.nan], [2.0, 4.0, 6.0]])
    means = boot.means(values)
    assert means[0] == pytest.approx([0.5, 1.0, 0.0])
    assert means[1] == pytest.approx([4.0, 2.0, (4 + 12) / 3])


def test_exact_mcnemar_on_a_hand_computed_case():
    # 10 pairs: 6 discordant, 5 of them for a. p = 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * 7/64 = 0.21875
    a = [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]
    b = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert mcnemar_exact(a, b) == pytest.approx(14 / 64)
    assert mcnemar_exact(b, a) == pytest.approx(14 / 64)
    # 8 discordant, all one way: 2 / 2^8
    assert mcnemar_exact([1] * 8 + [0, 1], [0] * 8 + [0, 1]) == pytest.approx(2 / 256)
    assert mcnemar_exact([1, 0], [1, 0]) == 1.0  # no discordant pair
    assert mcnemar_exact([1, 0, 1], [0, 1, 1]) == 1.0  # an even split is capped at 1
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact([1, 0], [1])


def test_bootstrap_p_value_inverts_the_percentile_interval():
    rng = np.random.default_rng(4)
    for shift in (0.0, 0.05, 0.1, 0.2):
        d = rng.normal(shift, 0.05, size=4000)
        lo, hi = percentile_interval(d)
        assert (bootstrap_p_value(d) < 0.05) == (lo > 0 or hi < 0)
    assert bootstrap_p_value(np.zeros(10)) == 1.0
    assert math.isnan(bootstrap_p_value(np.array([np.nan])))


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


def test_rank_ranges_and_tiers():
    rng = np.random.default_rng(5)
    far = np.stack([rng.normal(0.9, 0.001, 500), rng.normal(0.5, 0.001, 500), rng.normal(0.1, 0.001, 500)])
    assert rank_ranges(far) == [(1, 1), (2, 2), (3, 3)]
    close = np.stack([rng.normal(0.5, 0.05, 500), rng.normal(0.5, 0.05, 500), rng.normal(0.0, 0.01, 500)])
    assert rank_ranges(close) == [(1, 2), (1, 2), (3, 3)]
    # a ~ b, b ~ c, a separated from c: a leads tier 1 with b; c leads tier 2
    distinct = np.array([[False, False, True], [False, False, False], [True, False, False]])
    assert tiers([0, 1, 2], distinct) == [1, 1, 2]
    assert tiers([2, 1, 0], distinct) == [2, 1, 1]
