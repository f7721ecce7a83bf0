"""The statistics ``transferlab-compare`` shows (:mod:`transferlab.tools.stats` does the
maths): each run's val accuracy with its 95 % bootstrap interval, each seed (or fold) group's,
and the paired differences between them in words.

A run's per-image correctness comes from its ``predictions_val.npz`` (the predictions of
``best.pt``, recorded at the end of the run: :mod:`transferlab.run.predictions`), or, for a run
trained before runs recorded them, from the ``eval_predictions.npz`` of
``transferlab-eval run=<dir>`` (best.pt on val, raw weights, no TTA, no dataset overrides).
Either must be of the run's best epoch (a run resumed for more epochs makes its old one
stale). A seed group stacks its runs' rows (one per seed); a fold group puts its folds' val
images side by side (the pooled out-of-fold predictions); a group of both does both.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.run.predictions import EVAL_PREDICTIONS, load_predictions, predictions_file
from transferlab.tools.stats import (
    Interval,
    accuracy_interval,
    holm,
    mcnemar,
    paired_difference,
    verdict,
)

ALL_PAIRS_UP_TO = 4  # more rows than this: the best one against each other one
UNAVAILABLE = "n/a"
METHOD = ("intervals: 95 % percentile bootstrap of best.pt's val predictions (groups: images and "
          "seeds resampled together); differences: McNemar's exact test (two runs), a paired "
          "bootstrap over seeds and images (two groups); several pairs: decided by Holm's "
          "adjusted p")


@dataclass
class Scored:
    """Per-image correctness: ``correct`` ``(S, N)``, one row per seed (``rows``: their seed
    values), ``images``: what the columns are (per block of columns: the split's identity)."""

    correct: np.ndarray
    rows: tuple[str, ...]
    images: tuple[str, ...]

    @functools.cached_property
    def interval(self) -> Interval:
        return accuracy_interval(self.correct)


def read_scored(run_dir: Path, best_epoch: int | None) -> Scored | None:
    """A run's val correctness (None: no predictions of its best epoch)."""
    for name, own in ((predictions_file("val"), True), (EVAL_PREDICTIONS, False)):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            pred = load_predictions(path)
        except ValueError:
            continue
        header = pred.header or {}
        if header.get("epoch") != best_epoch or not (own or _plain_eval(header)):
            continue
        labels = hashlib.sha256(pred.targets.astype(np.int64).tobytes()).hexdigest()[:16]
        return Scored(pred.correct[None, :], ("",),
                      (f"{header.get('identity')}:{labels}:{len(pred.targets)}",))
    return None


def _plain_eval(header: dict) -> bool:
    """An ``eval_predictions.npz`` of what the run records itself: best.pt on val, raw."""
    return (header.get("checkpoint") == "best" and header.get("split") == "val"
            and header.get("weights") == "raw" and header.get("tta") == "none"
            and not header.get("dataset_overrides"))


def group_scored(members: Sequence[tuple[Scored | None, str, str]]) -> Scored | None:
    """A group's correctness from its members' ``(scored, row, block)``: members of one
    ``row`` (a seed) side by side in ``block`` order (folds), the rows stacked; None when a
    member has none or the rows do not cover the same images."""
    if not members or any(scored is None for scored, _, _ in members):
        return None
    rows: dict[str, list[tuple[str, Scored]]] = {}
    for scored, row, block in members:
        rows.setdefault(row, []).append((block, scored))
    built, images = [], None
    for row in sorted(rows, key=natural):
        blocks = sorted(rows[row], key=lambda item: natural(item[0]))
        row_images = tuple(i for _, s in blocks for i in s.images)
        if images is not None and row_images != images:
            return None
        images = row_images
        built.append(np.concatenate([s.correct[0] for _, s in blocks]))
    return Scored(np.stack(built), tuple(sorted(rows, key=natural)), images)


def natural(text: str) -> tuple:
    """Numbers in numeric order (fold 2 before fold 10), anything else after them."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def interval_text(scored: Scored | None) -> str:
    if scored is None:
        return UNAVAILABLE
    iv = scored.interval
    return f"[{iv.low:.4f}, {iv.high:.4f}]"


def interval_values(scored: Scored | None) -> tuple[float | None, float | None]:
    if scored is None:
        return None, None
    iv = scored.interval
    return iv.low, iv.high


def pairs(count: int) -> list[tuple[int, int]]:
    """Which rows to compare: every pair of a few, else the first (best) with each other."""
    if count <= ALL_PAIRS_UP_TO:
        return list(itertools.combinations(range(count), 2))
    return [(0, k) for k in range(1, count)]


def difference_lines(entries: Sequence[tuple[str, Scored | None]]) -> list[str]:
    """The pairwise verdicts of ``entries`` (label, correctness), in their order (best first);
    entries without correctness are left out; pairs on other images are said so. With several
    pairs, each verdict goes by Holm's adjusted p over them."""
    scored = [(label, s) for label, s in entries if s is not None]
    tested, lines = [], {}
    for i, j in pairs(len(scored)):
        (la, a), (lb, b) = scored[i], scored[j]
        if a.images != b.images:
            lines[(i, j)] = f"{la} vs {lb}: not on the same val images: no paired test"
        elif len(a.correct) == 1 and len(b.correct) == 1:
            tested.append(((i, j), mcnemar(a.correct[0], b.correct[0])))
        else:
            tested.append(((i, j), paired_difference(a.correct, b.correct,
                                                     a.rows == b.rows and len(a.rows) > 1)))
    adjusted = holm([d.p for _, d in tested]) if len(tested) > 1 else None
    for k, ((i, j), diff) in enumerate(tested):
        lines[(i, j)] = verdict(scored[i][0], scored[j][0], diff, adjusted=None
                                if adjusted is None else (float(adjusted[k]), len(tested)))
    return [lines[pair] for pair in sorted(lines)]


def statistics_text(entries: Sequence[tuple[str, Scored | None]]) -> list[str]:
    """The block printed under the table: what the intervals are, the verdicts, and which
    runs have none."""
    lines = difference_lines(entries)
    missing = sum(s is None for _, s in entries)
    out = [f"Val accuracy, {METHOD}."]
    out += [f"  {line}" for line in lines] if lines else ["  (fewer than two rows with "
                                                         "predictions: no pairs)"]
    if missing:
        out.append(f"  {missing} row(s) without predictions of their best epoch "
                   f"({predictions_file('val')}: runs record it when they end; for an older "
                   "run, transferlab-eval run=<dir> writes one): interval unavailable")
    return out
