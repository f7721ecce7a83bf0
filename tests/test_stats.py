"""Paired statistics (:mod:`transferlab.tools.stats`) checked against scipy, statsmodels and a
plain resampling loop on fixed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from transferlab.tools import stats

N = 200


def _fixed(n: int, right: int, seed: int) -> np.ndarray:
    """``n`` images of which ``right`` are right, in a fixed shuffled order."""
    correct = np.zeros(n, dtype=bool)
    correct[:right] = True
    return np.random.default_rng(seed).permutation(correct)


def test_the_accuracy_interval_is_scipys_percentile_bootstrap():
    correct = _fixed(N, 171, 0)  # 85.5 %
    ours = stats.accuracy_interval(correct)
    theirs = sps.bootstrap((correct.astype(float),), np.mean, n_resamples=20_000,
                           method="percentile", vectorized=True,
                           random_state=np.random.default_rng(1)).confidence_interval
    assert ours.estimate == pytest.approx(171 / N)
    one_image = 1 / N  # both are Monte-Carlo estimates of the same quantiles
    assert ours.low == pytest.approx(theirs.low, abs=one_image)
    assert ours.high == pytest.approx(theirs.high, abs=one_image)
    # ... whose limit is the binomial quantile (the count of right images in a resample)
    exact = sps.binom.ppf([0.025, 0.975], N, 171 / N) / N
    assert (ours.low, ours.high) == pytest.approx(tuple(exact), abs=one_image)
    assert ours.high - ours.low == pytest.approx(0.1, abs=0.015)  # ±5 points at n = 200
    assert stats.accuracy_interval(correct) == ours  # seeded


def test_mcnemar_p_is_statsmodels_exact_test():
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar  # (slow to import)

    a, b = _fixed(N, 170, 2), _fixed(N, 170, 2).copy()
    b[np.flatnonzero(a)[:14]] = False  # 14 images only A gets right
    b[np.flatnonzero(~a)[:4]] = True  # 4 only B gets right
    diff = stats.mcnemar(a, b)
    table = [[int((a & b).sum()), int((a & ~b).sum())],
             [int((~a & b).sum()), int((~a & ~b).sum())]]
    expected = sm_mcnemar(table, exact=True).pvalue
    assert diff.p == pytest.approx(expected, rel=1e-12)
    assert diff.p == pytest.approx(2 * sps.binom.cdf(4, 18, 0.5), rel=1e-12)  # 0.0309
    assert diff.estimate == pytest.approx((14 - 4) / N)
    assert diff.low < diff.estimate < diff.high
    assert diff.low > 0  # 10 images of 200 apart with 18 discordant: the interval excludes 0
    assert "14 vs 4 discordant of 200 images" in diff.test
    same = stats.mcnemar(a, a)
    assert (same.p, same.estimate, same.low, same.high) == (1.0, 0.0, 0.0, 0.0)


def test_a_group_interval_matches_resampling_images_and_seeds_one_by_one():
    matrix = np.stack([_fixed(120, 100, s) for s in range(3)])
    ours = stats.accuracy_interval(matrix)
    rng = np.random.default_rng(7)
    loop = []
    for _ in range(4000):  # the definition, written out
        seeds = rng.integers(0, 3, 3)
        images = rng.integers(0, 120, 120)
        loop.append(matrix[seeds][:, images].mean())
    low, high = np.percentile(loop, [2.5, 97.5])
    assert ours.estimate == pytest.approx(matrix.mean())
    assert (ours.low, ours.high) == pytest.approx((low, high), abs=0.01)
    single = stats.accuracy_interval(matrix[0])
    assert ours.high - ours.low > 0  # seeds widen it beyond one run's image noise
    assert single.high - single.low == pytest.approx(0.13, abs=0.03)


def test_paired_groups_tell_a_real_difference_from_none():
    a = np.stack([_fixed(300, 270, s) for s in range(3)])
    same = stats.paired_difference(a, a.copy(), paired_seeds=True)
    assert (same.estimate, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    worse = a.copy()
    worse[:, np.flatnonzero(a[0])[:30]] = False  # 30 images every seed of B gets wrong
    diff = stats.paired_difference(a, worse, paired_seeds=True)
    assert diff.estimate == pytest.approx(a.mean() - worse.mean())
    assert diff.low > 0 and diff.p < 0.01
    assert diff.test == "paired bootstrap over 3 seeds and 300 images"
    unpaired = stats.paired_difference(a, worse[:2], paired_seeds=False)
    assert unpaired.test == "paired bootstrap over 3 and 2 seeds and 300 images"
    with pytest.raises(ValueError, match="same images"):
        stats.paired_difference(a, a[:, :10], paired_seeds=True)


def test_the_verdict_is_said_in_words():
    close = stats.Difference(0.013, -0.006, 0.031, 0.21, "McNemar exact")
    assert stats.verdict("A", "B", close) == (
        "A − B = +1.3 points, 95 % CI [−0.6, +3.1], p = 0.21: not distinguishable "
        "(McNemar exact)")
    apart = stats.Difference(-0.04, -0.07, -0.01, 0.0004, "t")
    assert stats.verdict("A", "B", apart).endswith("p < 0.001: B is better (t)")


def test_holms_adjustment_is_statsmodels_and_decides_the_verdict():
    from statsmodels.stats.multitest import multipletests

    ps = [0.04, 0.23, 0.01, 0.39, 0.5]
    expected = multipletests(ps, method="holm")[1]
    assert stats.holm(ps) == pytest.approx(expected, rel=1e-12)
    assert stats.holm(ps).tolist() == pytest.approx([0.16, 0.69, 0.05, 0.78, 0.78])
    diff = stats.Difference(0.028, 0.006, 0.053, 0.04, "t")
    assert stats.verdict("A", "B", diff).endswith("p = 0.04: A is better (t)")
    assert stats.verdict("A", "B", diff, adjusted=(0.16, 5)).endswith(
        "p = 0.04 (0.16 after Holm over 5 pairs): not distinguishable (t)")
