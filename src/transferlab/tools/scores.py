"""Transferability scores: how well frozen features (or a source model's predictions) suit a
labelled target data set, without fine-tuning. Higher is better for every score here.

* :func:`logme`: LogME (You et al., ICML 2021): the log marginal likelihood (evidence) of a
  Bayesian linear model from the features to each one-hot label column, its prior and noise
  precisions found by MacKay's fixed-point iteration; per sample, averaged over the classes.
* :func:`leep`: LEEP (Nguyen et al., ICML 2020): the mean log-likelihood of the "expected
  empirical predictor" built from the source model's class probabilities.
* :func:`nce`: NCE (Tran et al., ICCV 2019): the negative conditional entropy of the target
  labels given the source model's hard labels.
* :func:`h_score`: H-score (Bao et al., ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))``, and
  :func:`h_score_shrinkage` (Ibrahim et al., 2022), its covariance shrunk (Ledoit-Wolf).
* :func:`transrate`: TransRate (Huang et al., ICML 2022): the coding rate of the (centred)
  features minus their coding rate given the class.

and the slow but honest reference, :func:`probe_accuracy` (scikit-learn, imported when it runs).

Everything is numpy (float64); ``features`` is (N, D), ``labels`` (N,) integers 0..C-1,
``probs`` (N, Z) rows that sum to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from transferlab.errors import UserError


@dataclass(frozen=True)
class Evidence:
    """LogME's fit of one label column: the evidence per sample and the precisions found."""

    evidence: float
    alpha: float  # the prior precision of the weights
    beta: float  # the noise precision
    iterations: int


def _spectrum(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, sigma): an orthonormal basis of F's column span and the non-zero eigenvalues of
    F^T F there (F = U sqrt(sigma) V^T), from the eigendecomposition of the smaller Gram
    matrix (faster than an SVD of a wide or tall F)."""
    n, d = features.shape
    gram = features @ features.T if n <= d else features.T @ features
    sigma, vectors = np.linalg.eigh(gram)
    keep = sigma > max(sigma.max(initial=0.0), 0.0) * max(n, d) * np.finfo(float).eps * 10
    sigma, vectors = sigma[keep], vectors[:, keep]
    u = vectors if n <= d else features @ vectors / np.sqrt(sigma)
    return u, sigma


def evidence_of(sigma: np.ndarray, x: np.ndarray, outside: float, n: int, d: int,
                alpha: float, beta: float) -> float:
    """The log evidence per sample of y = F w + noise (w ~ N(0, 1/alpha), noise ~ N(0,
    1/beta)), from F's spectrum ``sigma``, the projections ``x = U^T y`` and ``outside`` (the
    squared norm of y outside F's column span)."""
    t = alpha / beta
    m2 = float(np.sum(sigma * x**2 / (t + sigma) ** 2))  # |m|^2, m the posterior mean
    res2 = float(np.sum(x**2 / (1 + sigma / t) ** 2)) + outside  # |F m - y|^2
    logdet = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * math.log(alpha)
    total = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - alpha / 2 * m2
             - beta / 2 * res2 - logdet / 2 - n / 2 * math.log(2 * math.pi))
    return total / n


def fit_evidence(sigma: np.ndarray, x: np.ndarray, outside: float, n: int, d: int,
                 max_iter: int = 100, tol: float = 1e-6) -> Evidence:
    """MacKay's fixed point: gamma = sum sigma/(t + sigma), alpha = gamma/|m|^2,
    beta = (n - gamma)/|Fm - y|^2, from alpha = beta = 1 until t = alpha/beta settles."""
    alpha = beta = 1.0
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        t = alpha / beta
        gamma = float(np.sum(sigma / (t + sigma)))
        m2 = float(np.sum(sigma * x**2 / (t + sigma) ** 2))
        res2 = float(np.sum(x**2 / (1 + sigma / t) ** 2)) + outside
        alpha = gamma / max(m2, 1e-12)
        beta = max(n - gamma, 1e-12) / max(res2, 1e-12)
        if abs(alpha / beta - t) <= tol * t:
            break
    return Evidence(evidence_of(sigma, x, outside, n, d, alpha, beta), alpha, beta, iterations)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: the mean over classes of the maximised log evidence per sample of a Bayesian
    linear regression from the features to the class's one-hot column."""
    f, y = _checked(features, labels)
    n, d = f.shape
    u, sigma = _spectrum(f)
    scores = []
    for k in range(int(y.max()) + 1):
        target = (y == k).astype(np.float64)
        x = u.T @ target
        outside = max(float(target @ target - x @ x), 0.0)
        scores.append(fit_evidence(sigma, x, outside, n, d).evidence)
    return float(np.mean(scores))


def leep(probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: with P(y, z) the empirical joint of target labels and source probabilities and
    P(y | z) = P(y, z) / P(z), the mean of log sum_z P(y_i | z) theta_i(z)."""
    theta, y = _checked_probs(probs, labels)
    onehot = np.eye(int(y.max()) + 1)[y]  # (N, C)
    joint = onehot.T @ theta / len(y)  # (C, Z)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)
    eep = theta @ conditional.T  # (N, C): the expected empirical predictor
    return float(np.mean(np.log(np.maximum(eep[np.arange(len(y)), y], 1e-300))))


def nce(probs: np.ndarray, labels: np.ndarray) -> float:
    """NCE: -H(Y | Z), Z the source model's most probable class for each sample."""
    theta, y = _checked_probs(probs, labels)
    z = theta.argmax(axis=1)
    joint = np.zeros((int(y.max()) + 1, theta.shape[1]))
    np.add.at(joint, (y, z), 1.0)
    joint /= len(y)
    pz = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / np.broadcast_to(pz, joint.shape)[nz])))


def _class_mean_cov(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cov(g), g(x) the mean of x's class in the centred features ``f``."""
    means = np.stack([f[y == k].mean(axis=0) if np.any(y == k) else np.zeros(f.shape[1])
                      for k in range(int(y.max()) + 1)])
    g = means[y]
    return g.T @ g / len(f)


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score: tr(cov(f)^+ cov(g)), g(x) the mean feature of x's class. With more feature
    dimensions than samples cov(f) is singular and the score saturates at C-1: see
    :func:`h_score_shrinkage`."""
    f, y = _checked(features, labels)
    f = f - f.mean(axis=0)
    cov_f = f.T @ f / len(f)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True)
                          @ _class_mean_cov(f, y)))


def ledoit_wolf(f: np.ndarray) -> tuple[np.ndarray, float]:
    """(the Ledoit-Wolf shrunk covariance of the centred ``f``, its shrinkage): the sample
    covariance pulled towards mu I by the weight that minimises the expected squared error
    (Ledoit and Wolf, 2004)."""
    n, d = f.shape
    cov = f.T @ f / n
    mu = np.trace(cov) / d
    squares = f**2
    spread = float(np.sum(squares.T @ squares) / n - np.sum(cov**2)) / (d * n)
    distance = float(np.sum(cov**2) - 2 * mu * np.trace(cov) + d * mu**2) / d
    shrinkage = 0.0 if distance == 0 else min(spread, distance) / distance
    return (1 - shrinkage) * cov + shrinkage * mu * np.eye(d), shrinkage


def h_score_shrinkage(features: np.ndarray, labels: np.ndarray) -> float:
    """The regularised H-score (Ibrahim et al., 2022): cov(f) by Ledoit-Wolf shrinkage
    (weight a), tr(cov_a(f)^-1 (1 - a) cov(g)); meaningful when D exceeds N."""
    f, y = _checked(features, labels)
    f = f - f.mean(axis=0)
    cov_f, shrinkage = ledoit_wolf(f)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True)
                          @ ((1 - shrinkage) * _class_mean_cov(f, y))))


def coding_rate(z: np.ndarray, eps: float) -> float:
    """R(Z, eps) = 1/2 logdet(I + d/(n eps^2) Z^T Z), through the smaller Gram matrix."""
    n, d = z.shape
    gram = z.T @ z if d <= n else z @ z.T
    _, logdet = np.linalg.slogdet(np.eye(len(gram)) + d / (n * eps**2) * gram)
    return 0.5 * float(logdet)


def transrate(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4) -> float:
    """TransRate: R(Z, eps) - sum_k n_k/n R(Z_k, eps), Z the centred features."""
    f, y = _checked(features, labels)
    f = f - f.mean(axis=0)
    given = sum(np.mean(y == k) * coding_rate(f[y == k], eps)
                for k in np.unique(y))
    return float(coding_rate(f, eps) - given)


def _checked(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if f.ndim != 2 or len(f) != len(y) or len(y) < 2:
        raise UserError(f"scores need features (N, D) and N labels, N >= 2: got features "
                        f"{f.shape} and {len(y)} labels")
    if y.min() < 0 or len(np.unique(y)) < 2:
        raise UserError("scores need labels 0..C-1 of at least two classes: got "
                        f"{sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(f).all():
        raise UserError("the features hold NaN or inf: check the backbone's weights and "
                        "trainer.amp")
    return f, y


def _checked_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    theta, y = _checked(probs, labels)
    if theta.min() < 0 or not np.allclose(theta.sum(axis=1), 1.0, atol=1e-3):
        raise UserError("LEEP and NCE need the source model's class probabilities (rows of "
                        "non-negative numbers summing to 1)")
    return theta, y


@dataclass(frozen=True)
class Score:
    """A score's entry: its function of (features or probs, labels), and whether it reads the
    source model's class probabilities instead of the features."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    reads_probs: bool
    summary: str


SCORES: dict[str, Score] = {s.name: s for s in (
    Score("logme", logme, False, "LogME: evidence of a Bayesian linear model per sample"),
    Score("leep", leep, True, "LEEP: log-likelihood of the source-label predictor"),
    Score("nce", nce, True, "NCE: -H(target label | source label)"),
    Score("h_score", h_score, False, "H-score: between-class share of feature variance"),
    Score("h_score_shrinkage", h_score_shrinkage, False,
          "H-score with a Ledoit-Wolf shrunk covariance (for more dimensions than images)"),
    Score("transrate", transrate, False, "TransRate: coding rate minus class-given rate"),
)}


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5,
                   seed: int = 0) -> float:
    """The slow but honest reference: the mean held-out accuracy of a logistic regression
    (standardised features, C=1) over ``folds`` stratified folds of the training split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = min(folds, int(np.bincount(labels).min()))
    if k < 2:
        raise UserError("the probe needs at least 2 training images of every class")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(cross_val_score(model, features, labels, cv=cv).mean())


RANK_SCORES: dict[str, Score] = {**SCORES, "probe": Score(
    "probe", probe_accuracy, False, "probe: k-fold logistic-regression accuracy (slow, honest)")}
