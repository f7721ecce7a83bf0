"""``transferlab-eval``'s robustness parts: ImageNet-C-style corruptions of the evaluated split
(``corruptions=``, ``severity=``, ``seed=``: :mod:`transferlab.tools.corruptions`) and the
WiSE-FT curve (``wise=``: :mod:`transferlab.tools.wise`), added to ``eval.json`` as
``corruptions`` and ``wise``, with a figure each (``eval_corruptions.png``, ``eval_wise.png``),
TensorBoard records and console tables.

TensorBoard tags (``<tag>``: the split, as for the other eval records):
``eval/<tag>/corruptions/<name>/acc`` (step: the severity), ``eval/<tag>/corruptions/mean_acc``
(step: the checkpoint's epoch), ``eval/<tag>/wise/acc`` and ``eval/<tag>/wise/corruption_mean_acc``
(step: alpha x 100), and the two figures (``eval/<tag>/corruptions``, ``eval/<tag>/wise``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferlab.config import RunConfig
from transferlab.data.extra_test import named_split
from transferlab.data.transforms import eval_stages
from transferlab.errors import UserError
from transferlab.run.predictions import Predictions, predict
from transferlab.run.wise import load_start
from transferlab.tools.corruptions import (
    check_size,
    corruption_figure,
    corruption_grid,
    corruption_table,
)
from transferlab.tools.wise import wise_curve, wise_figure

CORRUPTIONS_PNG = "eval_corruptions.png"
WISE_PNG = "eval_wise.png"


@dataclass
class Scorer:
    """Scores a model on a dataset as ``transferlab-eval`` does: its loader, device, precision,
    memory format and scores (test-time augmentation's, where asked for)."""

    loader: Callable[[Dataset], DataLoader]
    device: torch.device
    precision: Any
    channels_last: bool
    scores: Callable

    def __call__(self, model: nn.Module, dataset: Dataset) -> Predictions:
        return predict(model, self.loader(dataset), self.device, self.precision,
                       self.channels_last, self.scores)


@dataclass
class Evaluated:
    """What an evaluation restored: the run's config and checkpoint, the model on its device,
    the backbone, the input size, the classes, the evaluated dataset and how it was scored."""

    run: RunConfig
    ckpt: dict
    model: nn.Module
    backbone: Any
    image_size: int
    classes: list[str]
    dataset: Dataset
    scorer: Scorer


@dataclass
class RobustnessArgs:
    """``corruptions=`` (empty: none), ``severity=``, ``seed=`` and ``wise=`` (empty: none)."""

    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    seed: int = 0
    wise: tuple[float, ...] = ()


def package_version() -> str:
    """The distribution that provides the ``imagecorruptions`` module, and its version."""
    names = importlib.metadata.packages_distributions().get("imagecorruptions") or []
    return ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names) or "imagecorruptions"


def robustness(run_dir: Path, split: str, dataset_overrides: dict | None, asked: RobustnessArgs,
               done: Evaluated, clean: float) -> dict[str, Any]:
    """``eval.json``'s ``corruptions`` and ``wise`` entries (those asked for)."""
    out: dict[str, Any] = {}
    grid: Callable[[], dict[str, Any]] | None = None  # the corruption grid of the model as it is
    if asked.corruptions:
        check_size(done.image_size)
        fixed, tail = eval_stages(done.backbone.input, done.image_size, done.run.dataset.crop_pct)
        base = named_split(done.run, done.backbone.input, done.image_size, split, done.classes,
                           fixed)
        grid = partial(corruption_grid, lambda d: done.scorer(done.model, d), base, tail,
                       asked.corruptions, asked.severities, asked.seed)
        out["corruptions"] = {**grid(), "clean_accuracy": clean, "package": package_version()}
    if asked.wise:
        start_model, start = load_start(run_dir, done.ckpt.get("config"), len(done.classes),
                                        dataset_overrides)
        epoch = done.ckpt.get("epoch")
        if epoch is not None and start["epoch"] is not None and epoch <= start["epoch"]:
            raise UserError(f"wise=: the checkpoint is of epoch {epoch}, before fine-tuning began "
                            f"(stage {start['stage']} after epoch {start['epoch']}): it holds the "
                            "start weights, so every alpha would give the same model; use "
                            "checkpoint=last")
        start_state = start_model.to(done.scorer.device).state_dict()

        def measure() -> dict[str, Any]:
            pred = done.scorer(done.model, done.dataset)
            point = {"accuracy": pred.accuracy, "loss": pred.loss}
            if grid is not None:
                point["corruption_mean_accuracy"] = grid()["mean_accuracy"]
            return point

        out["wise"] = {"start": start, "points": wise_curve(done.model, start_state, asked.wise,
                                                          measure)}
    return out


def wise_table(wise: dict[str, Any]) -> str:
    start = wise["start"]
    lines = [f"WiSE-FT: alpha 0 = the weights before stage {start['stage']} (after epoch "
             f"{start['epoch']}), alpha 1 = the evaluated checkpoint",
             "alpha  accuracy    loss" + ("  corrupted" if "corruption_mean_accuracy"
                                          in wise["points"][0] else "")]
    for p in wise["points"]:
        corrupted = (f"  {p['corruption_mean_accuracy']:9.4f}"
                     if "corruption_mean_accuracy" in p else "")
        lines.append(f"{p['alpha']:5.2f}  {p['accuracy']:8.4f}  {p['loss']:6.4f}{corrupted}")
    return "\n".join(lines)


def robustness_text(report: dict[str, Any]) -> str:
    """The console tables of the robustness entries in ``report`` ('' when none)."""
    parts = []
    if "corruptions" in report:
        parts.append(corruption_table(report["corruptions"], report["accuracy"], report["split"]))
    if "wise" in report:
        parts.append(wise_table(report["wise"]))
    return "\n\n".join(parts)


def write_robustness(run_dir: Path, report: dict[str, Any], tag: str) -> list[Path]:
    """The figures (PNG files and TensorBoard) and scalars of the robustness entries; the
    files written."""
    written, figures = [], []
    epoch, name = report["epoch"] or 0, f"{report['checkpoint']}.pt (epoch {report['epoch']})"
    if "corruptions" in report:
        figures.append(("corruptions", CORRUPTIONS_PNG, corruption_figure(
            report["corruptions"], report["accuracy"], f"{name} on corrupted {report['split']}")))
    if "wise" in report:
        figures.append(("wise", WISE_PNG, wise_figure(report["wise"]["points"],
                                                      f"WiSE-FT of {name} on {report['split']}")))
    if not figures:
        return written
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    try:
        for kind, file, fig in figures:
            fig.savefig(run_dir / file, dpi=110)
            written.append(run_dir / file)
            writer.add_figure(f"eval/{tag}/{kind}", fig, global_step=epoch, close=True)
        _scalars(writer, report, tag, epoch)
    finally:
        writer.close()
    return written


def _scalars(writer, report: dict[str, Any], tag: str, epoch: int) -> None:
    grid = report.get("corruptions")
    if grid is not None:
        for corruption, row in grid["accuracy"].items():
            for level, acc in row.items():
                writer.add_scalar(f"eval/{tag}/corruptions/{corruption}/acc", acc, int(level))
        writer.add_scalar(f"eval/{tag}/corruptions/mean_acc", grid["mean_accuracy"], epoch)
    for point in (report.get("wise") or {}).get("points", []):
        step = round(point["alpha"] * 100)
        writer.add_scalar(f"eval/{tag}/wise/acc", point["accuracy"], step)
        if "corruption_mean_accuracy" in point:
            writer.add_scalar(f"eval/{tag}/wise/corruption_mean_acc",
                              point["corruption_mean_accuracy"], step)
