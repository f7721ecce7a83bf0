"""The transferability scores (tools/scores.py) against hand-computed cases and independent
formulas, on fixed random features; and the properties that hold for them. Tolerances are
stated per test (float64 throughout)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferlab.errors import UserError
from transferlab.tools.scores import (
    SCORES,
    _spectrum,
    evidence_of,
    fit_evidence,
    h_score,
    leep,
    logme,
    nce,
    transrate,
)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """As transferlab-rank computes them: threads only contend on these small matrices."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        yield


def _gaussian_logpdf(y: np.ndarray, cov: np.ndarray) -> float:
    """log N(y; 0, cov), straight from the density (Cholesky)."""
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, y)
    return float(-0.5 * z @ z - np.log(np.diag(chol)).sum() - len(y) / 2 * math.log(2 * math.pi))


@pytest.mark.parametrize("n,d", [(40, 5), (12, 30)])  # more samples than features, and fewer
def test_logme_evidence_is_the_marginal_likelihood_of_the_linear_model(n, d):
    """The evidence LogME maximises, from the spectrum, equals log N(y; 0, I/beta + F F^T/alpha)
    computed densely (relative tolerance 1e-9), at the fitted precisions and at others."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    y = (rng.random(n) > 0.5).astype(float)
    u, sigma = _spectrum(f)
    x = u.T @ y
    outside = float(y @ y - x @ x)
    fit = fit_evidence(sigma, x, outside, n, d)
    for alpha, beta in ((fit.alpha, fit.beta), (0.3, 2.0), (5.0, 0.7)):
        dense = _gaussian_logpdf(y, np.eye(n) / beta + f @ f.T / alpha) / n
        ours = evidence_of(sigma, x, outside, n, d, alpha, beta)
        assert ours == pytest.approx(dense, rel=1e-9)


def test_logme_fixed_point_is_a_maximum_of_the_evidence():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(60, 8))
    y = (f[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(float)
    u, sigma = _spectrum(f)
    x = u.T @ y
    outside = float(y @ y - x @ x)
    fit = fit_evidence(sigma, x, outside, 60, 8)
    assert fit.iterations < 100  # it converged
    for da, db in ((1.2, 1.0), (0.8, 1.0), (1.0, 1.2), (1.0, 0.8)):
        assert evidence_of(sigma, x, outside, 60, 8, fit.alpha * da, fit.beta * db) \
            < fit.evidence


def _blobs(n_per_class: int, d: int, separation: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d)) * separation
    labels = np.repeat(np.arange(3), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), d)), labels


def test_logme_ranks_separable_features_above_random_ones():
    separable, labels = _blobs(40, 16, separation=3.0)
    random = np.random.default_rng(5).normal(size=separable.shape)
    weak, _ = _blobs(40, 16, separation=0.3)
    assert logme(separable, labels) > logme(weak, labels) > logme(random, labels)
    for name in ("h_score", "transrate"):
        fn = SCORES[name].fn
        assert fn(separable, labels) > fn(random, labels), name


def test_logme_is_invariant_to_rotating_the_features():
    """LogME reads the features through F F^T only: an orthogonal map leaves it (to 1e-9)."""
    f, labels = _blobs(20, 6, separation=1.0)
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(6, 6)))
    assert logme(f @ q, labels) == pytest.approx(logme(f, labels), rel=1e-9)
    assert transrate(f @ q, labels) == pytest.approx(transrate(f, labels), rel=1e-9)


def test_leep_by_hand():
    """Source probabilities theta, labels y: P(y | z) worked out on paper (z0: 7/9, 2/9;
    z1: 3/11, 8/11), then the mean log of sum_z P(y_i | z) theta_i(z); tolerance 1e-12."""
    theta = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1])
    expected = np.mean([math.log(0.8 * 7 / 9 + 0.2 * 3 / 11), math.log(0.6 * 7 / 9 + 0.4 * 3 / 11),
                        math.log(0.3 * 2 / 9 + 0.7 * 8 / 11), math.log(0.1 * 2 / 9 + 0.9 * 8 / 11)])
    assert leep(theta, y) == pytest.approx(expected, abs=1e-12)


def test_leep_is_zero_when_source_classes_decide_the_label():
    theta = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert leep(theta, np.array([1, 1, 0])) == pytest.approx(0.0, abs=1e-12)


def test_nce_by_hand():
    """z = argmax theta = [0, 0, 1, 1, 1], y = [0, 1, 1, 1, 0]: H(Y | z=0) = log 2,
    H(Y | z=1) = H(2/3, 1/3); NCE = -(2/5 log 2 + 3/5 H(2/3, 1/3)); tolerance 1e-12."""
    theta = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6], [0.1, 0.9]])
    y = np.array([0, 1, 1, 1, 0])
    h3 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert nce(theta, y) == pytest.approx(-(0.4 * math.log(2) + 0.6 * h3), abs=1e-12)
    assert nce(theta, np.array([0, 0, 1, 1, 1])) == pytest.approx(0.0, abs=1e-12)


def test_h_score_by_hand_and_under_an_invertible_map():
    """f = [0, 2, 4, 6], y = [0, 0, 1, 1]: var f = 5, class means -2, 2 -> cov g = 4,
    H = 4/5. In D dimensions H-score is invariant to any invertible linear map (1e-8)."""
    assert h_score(np.array([[0.0], [2.0], [4.0], [6.0]]), np.array([0, 0, 1, 1])) \
        == pytest.approx(0.8, abs=1e-12)
    f, labels = _blobs(30, 5, separation=1.0)
    a = np.random.default_rng(3).normal(size=(5, 5)) + 3 * np.eye(5)
    assert h_score(f @ a, labels) == pytest.approx(h_score(f, labels), rel=1e-8)


def test_transrate_by_hand():
    """1-D, eps = 1: f = [-1, 1, -3, 3] (mean 0), y = [0, 0, 1, 1]: R = 1/2 log(1 + 20/4),
    R_0 = 1/2 log(1 + 2/2), R_1 = 1/2 log(1 + 18/2); TransRate = R - (R_0 + R_1)/2 (1e-12)."""
    f = np.array([[-1.0], [1.0], [-3.0], [3.0]])
    expected = 0.5 * math.log(6) - 0.25 * math.log(2) - 0.25 * math.log(10)
    assert transrate(f, np.array([0, 0, 1, 1]), eps=1.0) == pytest.approx(expected, abs=1e-12)


def test_transrate_same_through_either_gram_matrix():
    """The coding rate through Z Z^T (D > N) equals the one through Z^T Z (1e-9)."""
    rng = np.random.default_rng(4)
    f, labels = rng.normal(size=(10, 25)), np.repeat([0, 1], 5)
    fc = f - f.mean(axis=0)

    def rate(z, eps=0.5):
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps**2) * z.T @ z)[1]

    by_definition = rate(fc) - sum(0.5 * rate(fc[labels == k]) for k in (0, 1))
    assert transrate(f, labels, eps=0.5) == pytest.approx(by_definition, rel=1e-9)


@pytest.mark.parametrize("features,labels,match", [
    (np.zeros((3, 2)), np.array([0, 0, 0]), "at least two classes"),
    (np.zeros((3, 2)), np.array([0, 1]), "features .3, 2. and 2 labels"),
    (np.full((2, 2), np.nan), np.array([0, 1]), "NaN"),
])
def test_bad_inputs_are_one_line_errors(features, labels, match):
    with pytest.raises(UserError, match=match) as err:
        logme(features, labels)
    assert "\n" not in str(err.value)


def test_probabilities_are_checked():
    with pytest.raises(UserError, match="class probabilities"):
        leep(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))


@pytest.mark.slow  # importing scikit-learn takes a second or two
def test_ledoit_wolf_matches_scikit_learn():
    """Our shrunk covariance and weight against scikit-learn's reference (rel. 1e-9)."""
    covariance = pytest.importorskip("sklearn.covariance")
    from transferlab.tools.scores import ledoit_wolf

    rng = np.random.default_rng(6)
    for n, d in ((50, 8), (20, 60)):
        f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        want_cov, want_shrinkage = covariance.ledoit_wolf(f)
        cov, shrinkage = ledoit_wolf(f - f.mean(axis=0))
        assert shrinkage == pytest.approx(want_shrinkage, rel=1e-9)
        np.testing.assert_allclose(cov, want_cov, rtol=1e-9, atol=1e-12)


def test_shrunk_h_score_does_not_saturate_when_dimensions_exceed_samples():
    """With D > N the plain H-score is C-1 for any features (1e-6); the shrunk one still
    tells separable features from random ones."""
    from transferlab.tools.scores import h_score_shrinkage

    separable, labels = _blobs(10, 80, separation=1.0)  # 30 samples, 80 dimensions
    random = np.random.default_rng(7).normal(size=separable.shape)
    assert h_score(separable, labels) == pytest.approx(2.0, abs=1e-6)
    assert h_score(random, labels) == pytest.approx(2.0, abs=1e-6)
    assert h_score_shrinkage(separable, labels) > 2 * h_score_shrinkage(random, labels)
