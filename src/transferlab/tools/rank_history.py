"""How well each score has ranked the candidates on this data set before: ``transferlab-rank``
reads the runs already trained (``against=``, ``outputs/`` by default) on the same data set
with the same candidate backbones, takes each backbone's best validation accuracy over its
completed runs (any policy, any learning rate: what fine-tuning it reached), and gives, per
score, Kendall's tau between the score and that accuracy over the backbones both have (and the
pairs in the right order), so that a score's number says how far to trust it here."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.tools.compare import RunRecord, find_runs
from transferlab.tools.rank import Row

METRIC = "best_val_acc"


@dataclass
class Before:
    """The runs found before, and how each score ranked their backbones."""

    dataset: str
    runs: int  # completed runs of the candidates on the data set
    accuracy: dict[str, float]  # backbone -> its best val acc over those runs
    tau: dict[str, float | None] = field(default_factory=dict)  # score -> Kendall's tau
    pairs: dict[str, tuple[int, int]] = field(default_factory=dict)  # score -> (in order, all)

    def line(self, score: str) -> str:
        """One plain line for a score, e.g. ``logme ranked them with Kendall's tau 0.33 (2 of
        3 pairs in order)``."""
        tau, (agree, total) = self.tau.get(score), self.pairs.get(score, (0, 0))
        if tau is None:
            return f"{score}: not comparable (fewer than 2 backbones with both numbers)"
        return (f"{score} ranked them with Kendall's tau {tau:+.2f} ({agree} of {total} "
                f"pair(s) in order)")


def backbone_of(run: RunRecord) -> str | None:
    """The backbone a run trained, as ``transferlab-rank`` names candidates: the preset, or
    the model name of a torchvision / timm backbone given by ``backbone.name``."""
    return run.hparams.get("backbone.name") or run.hparams.get("backbone")


def kendall(xs: list[float], ys: list[float]) -> tuple[float | None, int, int]:
    """Kendall's tau-b of two paired lists (scipy's), and the pairs ordered alike out of the
    pairs that are not tied in either; tau None for fewer than 2 items or no untied pair."""
    from scipy.stats import kendalltau

    pairs = [(a, b) for a, b in itertools.combinations(range(len(xs)), 2)
             if xs[a] != xs[b] and ys[a] != ys[b]]
    agree = sum((xs[a] - xs[b]) * (ys[a] - ys[b]) > 0 for a, b in pairs)
    if len(xs) < 2 or not pairs:
        return None, agree, len(pairs)
    tau = float(kendalltau(xs, ys).statistic)
    return (None if math.isnan(tau) else tau), agree, len(pairs)


def before(rows: list[Row], scores: list[str], dataset: str, roots: list[Path]) -> Before | None:
    """What the runs under ``roots`` say about the ranking of ``rows`` (whole backbones) on
    the data set named ``dataset``; None when no completed run of two candidates is there."""
    candidates = {r.backbone for r in rows if r.block is None and r.error is None}
    runs = [r for root in roots if root.is_dir() for r in find_runs([root], scored=False)
            if r.status == "completed" and r.hparams.get("dataset") == dataset
            and backbone_of(r) in candidates and r.value(METRIC) is not None]
    accuracy: dict[str, float] = {}
    for run in runs:
        name = backbone_of(run)
        accuracy[name] = max(accuracy.get(name, -math.inf), run.value(METRIC))
    if len(accuracy) < 2:
        return None
    found = Before(dataset, len(runs), dict(sorted(accuracy.items(), key=lambda kv: -kv[1])))
    for score in scores:
        have = [r for r in rows if r.block is None and r.backbone in accuracy
                and r.scores.get(score) is not None]
        tau, agree, total = kendall([r.scores[score] for r in have],
                                    [accuracy[r.backbone] for r in have])
        found.tau[score], found.pairs[score] = tau, (agree, total)
    return found


def before_text(found: Before, roots: list[Path]) -> list[str]:
    """The console's lines about the runs before."""
    where = ", ".join(str(r) for r in roots)
    accs = ", ".join(f"{b} {a:.4f}" for b, a in found.accuracy.items())
    return [f"before, on {found.dataset}: {found.runs} completed run(s) under {where} trained "
            f"{len(found.accuracy)} of these backbones (best val acc: {accs})",
            *(f"  {found.line(s)}" for s in found.tau)]
