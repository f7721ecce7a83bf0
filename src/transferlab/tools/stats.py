"""Paired statistics of classifiers scored image by image (``transferlab-compare``).

Every function takes correctness matrices: ``(S, N)`` booleans, one row per seed (one row for
a single run), one column per image; every row of a matrix, and the matrices compared with
each other, cover the same images in the same order (the predictions files of
:mod:`transferlab.run.predictions`). Accuracy is the mean over seeds and images.

- :func:`accuracy_interval`: the 95 % percentile bootstrap interval of an accuracy. One run:
  the images are resampled (the count of correct ones in a resample is binomial, so it is
  drawn as such: the same distribution as resampling the images one by one, in one numpy
  call). A seed group: the images and the seeds are resampled together (a two-level bootstrap:
  image noise and seed noise both widen it).
- :func:`mcnemar`: two single runs on the same images: McNemar's exact test, the two-sided
  binomial test (scipy's ``binomtest``) of the discordant pairs (images one run gets right and
  the other wrong) against 1/2; with the paired bootstrap interval of the difference.
- :func:`paired_difference`: two seed groups on the same images: a paired bootstrap. Each
  resample draws the images once for both groups (paired by image) and the seeds once for both
  when they share their seeds (paired by seed: the same seed gives both the same data order
  and head initialisation), else each group's seeds on their own. The interval is the
  percentile interval of the difference; ``p`` is twice its smaller tail beyond 0 (capped at
  1: the level at which the interval would just reach 0). With few seeds the seed level takes
  few distinct values (3 seeds: 10 multisets), so the interval is coarse at that level.

- :func:`holm`: Holm's step-down adjustment of the p-values of several pairs tested at once.

Everything is seeded (``seed``): the same inputs give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
REPS = 10_000
SEED = 0
_BLOCK = 4_000_000  # resampled (replicate, pattern) counts held at once


@dataclass(frozen=True)
class Interval:
    """An estimate and its bootstrap interval (fractions, not points)."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Difference:
    """``A - B`` of two accuracies: its interval, ``p`` and the test that gave ``p``."""

    estimate: float
    low: float
    high: float
    p: float
    test: str


def as_matrix(correct) -> np.ndarray:
    """``(S, N)`` booleans from a vector (one run) or a matrix; ValueError when empty."""
    matrix = np.asarray(correct, dtype=bool)
    matrix = matrix[None, :] if matrix.ndim == 1 else matrix
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"correctness must be (N,) or (S, N) and not empty, not "
                         f"{np.shape(correct)}")
    return matrix


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def accuracy_interval(correct, reps: int = REPS, seed: int = SEED,
                      level: float = LEVEL) -> Interval:
    """The accuracy of ``correct`` ((N,) or (S, N)) and its percentile bootstrap interval."""
    matrix = as_matrix(correct)
    rng = np.random.default_rng(seed)
    if len(matrix) == 1:
        n = matrix.shape[1]
        draws = rng.binomial(n, matrix.mean(), size=reps) / n
    else:
        draws = _group_draws([matrix], reps, rng, paired_seeds=False)[0]
    return Interval(float(matrix.mean()), *_percentiles(draws, level))


def _group_draws(matrices: list[np.ndarray], reps: int, rng: np.random.Generator,
                 paired_seeds: bool) -> np.ndarray:
    """``(len(matrices), reps)`` bootstrap accuracies: each replicate resamples the images
    once for every matrix, and the seeds once for all (``paired_seeds``) or per matrix.

    Resampling images only matters through their columns' patterns (which rows got the image
    right): a resample's count of each pattern is multinomial over the patterns' frequencies,
    so it is drawn as such (the same distribution as drawing N images one by one)."""
    stacked = np.concatenate(matrices)  # (S_total, N)
    n = stacked.shape[1]
    patterns, freq = np.unique(stacked.T, axis=0, return_counts=True)  # (T, S_total), (T,)
    out = np.empty((len(matrices), reps))
    block = max(1, _BLOCK // len(patterns))
    for start in range(0, reps, block):
        b = min(block, reps - start)
        per_row = rng.multinomial(n, freq / n, size=b) @ patterns.astype(np.float64)
        offset, seeds = 0, None
        for k, matrix in enumerate(matrices):
            s = len(matrix)
            if seeds is None or not paired_seeds:
                seeds = rng.multinomial(s, np.full(s, 1.0 / s), size=b)  # (b, S) seed counts
            out[k, start:start + b] = (seeds * per_row[:, offset:offset + s]).sum(1) / (s * n)
            offset += s
    return out


def _tails_p(diff: np.ndarray) -> float:
    return float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))


def mcnemar(a, b, reps: int = REPS, seed: int = SEED, level: float = LEVEL) -> Difference:
    """Two single runs on the same images: ``A - B``, the paired bootstrap interval (the
    images resampled together: a multinomial draw of the three kinds of image, A alone right,
    B alone right, both alike) and McNemar's exact ``p``."""
    from scipy.stats import binomtest  # here: transferlab-compare --help answers without SciPy

    a, b = as_matrix(a)[0], as_matrix(b)[0]
    _same_images(a, b)
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    draws = np.random.default_rng(seed).multinomial(
        n, [only_a / n, only_b / n, 1.0 - (only_a + only_b) / n], size=reps)
    diff = (draws[:, 0] - draws[:, 1]) / n
    return Difference((only_a - only_b) / n, *_percentiles(diff, level), float(p),
                      f"McNemar exact, {only_a} vs {only_b} discordant of {n} images")


def paired_difference(a, b, paired_seeds: bool, reps: int = REPS, seed: int = SEED,
                      level: float = LEVEL) -> Difference:
    """Two seed groups on the same images: ``A - B`` (mean accuracies), its paired bootstrap
    interval and ``p`` (see the module's notes). ``paired_seeds``: row k of ``a`` and of
    ``b`` ran with the same seed."""
    a, b = as_matrix(a), as_matrix(b)
    _same_images(a[0], b[0])
    if paired_seeds and len(a) != len(b):
        raise ValueError(f"paired seeds need as many rows: {len(a)} and {len(b)}")
    draws = _group_draws([a, b], reps, np.random.default_rng(seed), paired_seeds)
    diff = draws[0] - draws[1]
    seeds = f"{len(a)} seeds" if paired_seeds else f"{len(a)} and {len(b)} seeds"
    return Difference(float(a.mean() - b.mean()), *_percentiles(diff, level), _tails_p(diff),
                      f"paired bootstrap over {seeds} and {a.shape[1]} images")


def _same_images(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"paired statistics need the same images: {a.shape[-1]} and "
                         f"{b.shape[-1]}")


def points(value: float, sign: bool = True) -> str:
    """A fraction as percentage points, with a real minus sign (``+1.3``, ``−0.6``)."""
    text = f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"
    return text.replace("-", "−")


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def holm(ps) -> np.ndarray:
    """Holm's step-down adjustment of ``ps`` (several pairs tested at once): the smallest is
    multiplied by their number, the next by one less, ..., kept non-decreasing, capped at 1.
    Deciding on these keeps the chance of any false "is better" at ``alpha``."""
    ps = np.asarray(ps, dtype=float)
    order = np.argsort(ps, kind="stable")
    scaled = ps[order] * (len(ps) - np.arange(len(ps)))
    adjusted = np.empty_like(ps)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def verdict(a: str, b: str, diff: Difference, alpha: float = 0.05,
            adjusted: tuple[float, int] | None = None) -> str:
    """``A − B = +1.3 points, 95 % CI [−0.6, +3.1], p = 0.21: not distinguishable``.
    ``adjusted``: (Holm's p, the number of pairs) when several pairs were tested: the verdict
    goes by it."""
    p = diff.p if adjusted is None else adjusted[0]
    said = "not distinguishable" if p >= alpha else f"{a if diff.estimate > 0 else b} is better"
    holm_said = ("" if adjusted is None else
                 f" ({p_text(adjusted[0]).removeprefix('p ').lstrip('= ')} after Holm over "
                 f"{adjusted[1]} pairs)")
    return (f"{a} − {b} = {points(diff.estimate)} points, {LEVEL:.0%} CI "
            f"[{points(diff.low)}, {points(diff.high)}], {p_text(diff.p)}{holm_said}: {said} "
            f"({diff.test})").replace("95%", "95 %")
