"""WiSE-FT curves (Wortsman et al. 2022): a run's weights interpolated between the start of its
fine-tuning and its final weights (:mod:`transferlab.run.wise`), scored at each ``alpha``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from transferlab.run.wise import interpolate


def wise_curve(model: nn.Module, start: dict[str, torch.Tensor], points: tuple[float, ...],
               measure: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """For each ``alpha``, ``model`` holding the interpolation of ``start`` and its own
    (final) weights, and what ``measure()`` says of it; ``model``'s final weights are back
    afterwards."""
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve = []
    try:
        for a in points:
            model.load_state_dict(interpolate(start, final, a))
            curve.append({"alpha": a, **measure()})
    finally:
        model.load_state_dict(final)
    return curve


def wise_figure(curve: list[dict[str, Any]], title: str):
    """In-distribution accuracy (and the mean corruption accuracy, where measured) against
    alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["alpha"] for p in curve]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(xs, [p["accuracy"] for p in curve], marker="o", label="in distribution")
    if "corruption_mean_accuracy" in curve[0]:
        ax.plot(xs, [p["corruption_mean_accuracy"] for p in curve], marker="s",
                label="mean corruption accuracy")
    ax.set_xlabel("alpha (0: start of fine-tuning, 1: final weights)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(min(xs) - 0.02, max(xs) + 0.02)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
