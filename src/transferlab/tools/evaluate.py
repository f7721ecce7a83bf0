"""``transferlab-eval``: evaluate a saved checkpoint of a run on one of its data splits.

    transferlab-eval run=outputs/runs/2026-11-23/10-00-00_digits-...     # best.pt on val
    transferlab-eval run=<run dir> checkpoint=last split=val
    transferlab-eval run=<run dir> weights=ema checkpoint=best_ema       # the EMA of the weights
    transferlab-eval run=<run dir> dataset.root=/data/other_copy            # dataset.* overrides
    transferlab-eval run=<run dir> device=cpu
    transferlab-eval run=<run dir> tta=flip                                 # test-time augmentation
    transferlab-eval --help                                                  # every key

Arguments are ``key=value``, as for ``transferlab-train`` (:mod:`transferlab.cli.args`); a mistake
is one line ``error: <message>`` on stderr and exit code 2.

The model is rebuilt from the config saved in the checkpoint (backbone without pretrained
weights: they come from the checkpoint) and the split is rebuilt with the run's config and
its eval preprocessing, so ``best.pt`` on ``val`` reproduces the val accuracy the run recorded.

``tta=flip|five_crop|ten_crop`` averages the softmax probabilities over views of each image
(:mod:`transferlab.tools.tta`); the reports and the summary say which (``tta``, default ``none``).

Writes into the run directory (each evaluation replaces the previous one's files):

* ``eval.json``: checkpoint, epoch, split, weights (``raw``, or ``ema``: the EMA of the
  weights a run with ``trainer.ema.decay`` keeps), tta, accuracy, loss, per-class precision /
  recall / F1 / support, macro and weighted averages and the confusion matrix (rows: true
  class, columns: predicted class);
* ``eval_predictions.npz``: every image's label, predicted class and probability of its label
  (:mod:`transferlab.run.predictions`; the run's own ``predictions_<split>.npz`` stay as
  the run wrote them);
* ``eval_confusion_matrix.png``: the confusion matrix as a figure, each class's accuracy
  (recall) as a bar beside it;
* ``tb/``: the same figure (tag ``eval/<split>/confusion_matrix``) and the accuracy and loss
  (``eval/<split>/acc``, ``eval/<split>/loss``) at the checkpoint's epoch; with TTA the tags
  are ``eval/<split>_tta_<mode>/...``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferlab.config import RunConfig
from transferlab.data import default_num_workers
from transferlab.data.extra_test import named_split
from transferlab.errors import UserError
from transferlab.feature_cache.identity import dataset_identity
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.infra.runtime import Precision, pick_device
from transferlab.run.predictions import (
    EVAL_PREDICTIONS,
    Predictions,
    logits_scores,
    save_predictions,
)
from transferlab.run.saved import (
    checkpoint_config,
    checkpoint_path,
    restore_saved,
)
from transferlab.tools.robustness import Evaluated, RobustnessArgs, Scorer, robustness
from transferlab.tools.tta import describe, mean_log_probs, views_transform

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

EVAL_JSON = "eval.json"
EVAL_PNG = "eval_confusion_matrix.png"


@dataclass
class EvalArgs:
    """The parsed command line."""

    run: Path
    checkpoint: str = "best"
    split: str = "val"
    weights: str = "raw"  # raw | ema (the EMA of the weights, trainer.ema)
    device: str | None = None  # None: the run's trainer.device
    tta: str = "none"  # test-time augmentation (transferlab.tools.tta)
    dataset: dict[str, Any] | None = None  # dataset.<field> overrides
    robust: RobustnessArgs = field(default_factory=RobustnessArgs)  # corruptions=, wise=
    mistakes: bool = False  # also eval_mistakes.png (transferlab.tools.mistakes)
    output: Path | None = None  # where the files go; None: the run directory

    @property
    def out(self) -> Path:
        """The folder the evaluation's files are written into."""
        return self.output if self.output is not None else self.run


# -- checkpoint, config, model, data -------------------------------------------------------------
def eval_dataset(run: RunConfig, backbone, image_size: int, split: str,
                 classes: list[str], tta: str = "none") -> Dataset:
    """The ``split`` dataset of the run (val, test or a ``dataset.extra_test`` set by name:
    :func:`~transferlab.data.extra_test.named_split`), with the eval transform (``tta``'s views
    of each image, ``(V, C, H, W)``, unless ``none``)."""
    views = None if tta == "none" else views_transform(tta, backbone.input, image_size,
                                                       run.dataset.crop_pct)
    return named_split(run, backbone.input, image_size, split, classes, views)


def eval_loader(dataset: Dataset, run: RunConfig, device: torch.device) -> DataLoader:
    """An ordered loader with the run's eval batch size and workers."""
    trainer = run.trainer
    workers = default_num_workers() if trainer.num_workers is None else trainer.num_workers
    return DataLoader(dataset, batch_size=trainer.eval_batch_size or 2 * trainer.batch_size,
                      shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")


def tta_scores(channels_last: bool):
    """The log-probabilities of a batch: of its images, or for ``(B, V, C, H, W)`` views
    (test-time augmentation) the mean of the views' probabilities
    (:func:`transferlab.tools.tta.mean_log_probs`)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            return mean_log_probs(model, x, fmt)
        return logits_scores(model, x)

    return scores


# -- metrics and reports -------------------------------------------------------------------------
def classification_metrics(pred: Predictions, classes: list[str]) -> dict[str, Any]:
    """Accuracy, loss, per-class precision / recall / F1 / support, averages, confusion matrix."""
    labels = list(range(len(classes)))
    n = len(pred.targets)
    precision, recall, f1, support = precision_recall_fscore_support(
        pred.targets, pred.predicted, labels=labels, zero_division=0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]),
               "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            pred.targets, pred.predicted, labels=labels, average=average, zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    matrix = confusion_matrix(pred.targets, pred.predicted, labels=labels)
    return {
        "samples": n,
        "accuracy": int((pred.targets == pred.predicted).sum()) / max(n, 1),
        "loss": pred.loss,
        "per_class": per_class,
        "average": averages,
        "confusion_matrix": matrix.tolist(),
    }


def confusion_figure(matrix: list[list[int]], classes: list[str], title: str = "") -> Figure:
    """The confusion matrix (rows: true, columns: predicted) with counts in the cells, and
    beside it each class's accuracy (its recall: the diagonal over the row) as a bar, on the
    matrix's rows."""
    counts = np.asarray(matrix)
    side = min(max(4.0, 0.55 * len(classes) + 2.0), 20.0)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(side + 1.0 + 0.4 * side, side),
                                   gridspec_kw={"width_ratios": [1.0, 0.4]})
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45 if max(map(len, classes)) > 3 else 0,
                  ha="right" if max(map(len, classes)) > 3 else "center")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    if title:
        ax.set_title(title)
    per_class_bars(bars, counts, classes)
    fig.tight_layout()
    return fig


def per_class_accuracy(counts: np.ndarray) -> np.ndarray:
    """Each class's accuracy (recall) from a confusion matrix; NaN for a class with no image."""
    totals = counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(counts) / np.maximum(totals, 1), np.nan)


def per_class_bars(ax, counts: np.ndarray, classes: list[str]) -> None:
    """Per-class accuracy as horizontal bars, top to bottom in the matrix's row order, the
    overall accuracy dashed."""
    acc = per_class_accuracy(counts)
    rows = np.arange(len(classes))
    ax.barh(rows, np.nan_to_num(acc), color="C0", height=0.7)
    for row, value in zip(rows, acc, strict=True):
        ax.text(min(value, 0.98) if value == value else 0.0, row,
                f" {value:.2f}" if value == value else " no images", va="center",
                ha="right" if value == value and value > 0.5 else "left", fontsize=8,
                color="white" if value == value and value > 0.5 else "black")
    total = counts.sum()
    if total:
        ax.axvline(np.trace(counts) / total, color="0.3", linestyle="--", linewidth=1,
                   label="overall")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(len(classes) - 0.5, -0.5)  # the matrix's row order
    ax.set_yticks(rows, labels=classes)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (recall)")
    ax.set_title("per class")


def summary_text(report: dict[str, Any]) -> str:
    """The printed summary: accuracy, loss and a per-class table."""
    width = max(len("weighted avg"), *(len(c) for c in report["per_class"]))
    lines = [
        f"{report['checkpoint']}.pt (epoch {report['epoch']}"
        f"{', EMA weights' if report.get('weights') == 'ema' else ''}) on {report['split']}: "
        f"{report['samples']} images, {describe(report.get('tta', 'none'))}",
        f"accuracy {report['accuracy']:.4f}   loss {report['loss']:.4f}",
        "",
        f"{'class':<{width}}  precision  recall      f1  support",
    ]
    for name, m in report["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  "
                     f"{m['f1']:6.4f}  {m['support']:7d}")
    for average, m in report["average"].items():
        lines.append(f"{average + ' avg':<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  "
                     f"{m['f1']:6.4f}  {report['samples']:7d}")
    return "\n".join(lines)


def tb_tag(split: str, tta: str) -> str:
    """The TensorBoard tag group of an evaluation: ``val``, or ``val_tta_flip`` with TTA."""
    return split if tta == "none" else f"{split}_tta_{tta}"


def write_reports(run_dir: Path, report: dict[str, Any], classes: list[str]) -> tuple[Path, Path]:
    """``eval.json``, the confusion-matrix PNG and the TensorBoard records; their paths."""
    json_path, png_path = run_dir / EVAL_JSON, run_dir / EVAL_PNG
    json_path.write_text(json.dumps(report, indent=2))
    split, epoch, tta = report["split"], report["epoch"], report.get("tta", "none")
    ema = "_ema" if report.get("weights") == "ema" else ""
    with_tta = "" if tta == "none" else f", tta={tta}"
    title = (f"{report['checkpoint']}.pt (epoch {epoch}) on {split}{with_tta}: "
             f"acc {report['accuracy']:.4f}")
    fig = confusion_figure(report["confusion_matrix"], classes, title)
    tag = tb_tag(split, tta)
    fig.savefig(png_path, dpi=110)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    try:
        writer.add_figure(f"eval/{tag}/confusion_matrix", fig, global_step=epoch, close=True)
        writer.add_scalar(f"eval/{tag}/acc{ema}", report["accuracy"], epoch)
        writer.add_scalar(f"eval/{tag}/loss{ema}", report["loss"], epoch)
    finally:
        writer.close()
    return json_path, png_path


# -- the whole evaluation ----------------------------------------------------------------------
def evaluate_run(args: EvalArgs) -> dict[str, Any]:
    """Evaluate ``args.checkpoint`` of ``args.run`` on ``args.split``; the eval.json record."""
    path = checkpoint_path(args.run, args.checkpoint)
    if args.output is not None:
        try:
            args.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"output={args.output}: cannot make the folder "
                            f"({exc.strerror or exc}): give a writable one") from None
    ckpt = load_checkpoint(path)
    run = checkpoint_config(ckpt, args.dataset)
    classes = [str(c) for c in ckpt.get("classes") or []]
    if "model" not in ckpt or not classes:
        raise UserError(f"{path} holds no model weights or class names")
    model, backbone, image_size = restore_saved(run, ckpt, path, args.weights, len(classes))
    dataset = eval_dataset(run, backbone, image_size, args.split, classes, args.tta)
    device = pick_device(args.device or run.trainer.device)
    channels_last = run.trainer.channels_last and len(backbone.feature_shape) == 3
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scorer = Scorer(partial(eval_loader, run=run, device=device), device,
                    Precision(device, run.trainer.amp, inference=True), channels_last,
                    tta_scores(channels_last))
    pred = scorer(model, dataset)
    identity = dataset_identity(dataset) if not args.dataset and args.tta == "none" else None
    save_predictions(args.out / EVAL_PREDICTIONS, pred, {
        "checkpoint": args.checkpoint, "epoch": ckpt.get("epoch"), "weights": args.weights,
        "split": args.split, "tta": args.tta, "classes": classes, "identity": identity,
        "dataset_overrides": args.dataset or {}})
    report = {
        "run": str(args.run), "checkpoint": args.checkpoint, "checkpoint_path": str(path),
        "epoch": ckpt.get("epoch"), "split": args.split, "weights": args.weights,
        "tta": args.tta,
        "dataset_overrides": args.dataset or {}, "device": str(device),
        "classes": classes, **classification_metrics(pred, classes),
    }
    done = Evaluated(run, ckpt, model, backbone, image_size, classes, dataset, scorer)
    if args.mistakes:  # (drawn from the split's images, without TTA's views)
        from transferlab.tools.mistakes import eval_mistakes

        plain = dataset if args.tta == "none" else eval_dataset(run, backbone, image_size,
                                                                args.split, classes)
        with_tta = "" if args.tta == "none" else f", tta={args.tta}"
        heading = f"{args.checkpoint}.pt (epoch {ckpt.get('epoch')}) on {args.split}{with_tta}"
        eval_mistakes(args.out, done, plain, pred, heading, tb_tag(args.split, args.tta))
    report.update(robustness(args.run, args.split, args.dataset, args.robust, done,
                             report["accuracy"]))
    return report
