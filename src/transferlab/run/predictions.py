"""Per-image predictions of a classifier on one split: what paired statistics compare
(:mod:`transferlab.tools.stats`, ``transferlab-compare``).

A file holds, for every image of the split in the split's order: its index, its label, the
predicted class and the probability the model gave the label, plus a JSON header (the split,
the checkpoint and epoch, the classes, the split's identity hash). ``predictions_<split>.npz``
is what a classification run records at its end (:func:`record_run_predictions`, the weights of
``best.pt``); ``transferlab-eval`` writes ``eval_predictions.npz`` for the split it evaluates.

Reading a file needs numpy only (``transferlab-compare`` imports no torch); computing one
imports torch where it is used.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.infra.run_dirs import fsync_dir

if TYPE_CHECKING:
    import torch
    from torch import nn

    from transferlab.run.build import BuiltRun

log = logging.getLogger("transferlab")

FORMAT = "transferlab-predictions/1"
EVAL_PREDICTIONS = "eval_predictions.npz"


def predictions_file(split: str) -> str:
    """The file a run records its ``split``'s predictions in."""
    return f"predictions_{split}.npz"


@dataclass
class Predictions:
    """Every sample's true and predicted class, the probability of its true class, and the
    mean cross-entropy loss; ``header``: where they come from (split, checkpoint, ...)."""

    targets: np.ndarray
    predicted: np.ndarray
    label_prob: np.ndarray
    loss: float
    header: dict[str, Any] | None = None

    @property
    def correct(self) -> np.ndarray:
        return self.targets == self.predicted

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.targets) else 0.0


def logits_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A classifier's log-probabilities of a batch (the default :func:`predict` scores)."""
    import torch

    return torch.log_softmax(model(x).float(), dim=1)


def predict(model: nn.Module, loader, device: torch.device, precision, channels_last: bool,
            scores: Callable | None = None) -> Predictions:
    """Run ``model`` (in eval mode) over ``loader`` (in its order), as the training loop's
    evaluation does. ``scores(model, x)``: the batch's log-probabilities (default: the log
    softmax of the logits; test-time augmentation passes its mean over views). Inputs of 4
    dimensions go channels-last where ``channels_last`` says so (cached features stay as
    they are)."""
    import torch
    from torch.nn import functional as F

    scores = scores or logits_scores
    model.eval()
    targets, predicted, probs, loss_sum = [], [], [], 0.0
    with torch.no_grad():
        for x, y in loader:
            fmt = (torch.channels_last if channels_last and x.ndim == 4
                   else torch.contiguous_format)
            x, y = x.to(device, memory_format=fmt), y.to(device)
            with precision.autocast():
                log_p = scores(model, x).float()
            loss_sum += float(F.nll_loss(log_p, y, reduction="sum"))
            targets.append(y.cpu())
            predicted.append(log_p.argmax(1).cpu())
            probs.append(log_p.gather(1, y[:, None]).squeeze(1).exp().cpu())
    y_true = _joined(targets, np.int64)
    return Predictions(y_true, _joined(predicted, np.int64), _joined(probs, np.float32),
                       loss_sum / max(len(y_true), 1))


def _joined(parts: list, dtype) -> np.ndarray:
    import torch

    return torch.cat(parts).numpy().astype(dtype) if parts else np.zeros(0, dtype=dtype)


def save_predictions(path: Path, pred: Predictions, header: dict[str, Any]) -> Path:
    """``pred`` as a compressed ``.npz`` at ``path``, written atomically (a temporary file,
    fsynced, renamed over ``path``, the folder fsynced): a crash leaves the old file or the
    new one. ``header`` (JSON) gets the format, the sample count and the accuracy."""
    header = {"format": FORMAT, **header, "samples": len(pred.targets),
              "accuracy": pred.accuracy, "loss": pred.loss}
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, index=np.arange(len(pred.targets), dtype=np.int32),
        label=pred.targets.astype(np.int32), predicted=pred.predicted.astype(np.int32),
        label_prob=pred.label_prob.astype(np.float32), header=np.array(json.dumps(header)))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def load_predictions(path: Path) -> Predictions:
    """A predictions file; ValueError (one line) when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} file")
            order = np.argsort(data["index"], kind="stable")
            return Predictions(data["label"][order].astype(np.int64),
                               data["predicted"][order].astype(np.int64),
                               data["label_prob"][order], float(header.get("loss") or 0.0),
                               header)
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable predictions ({exc})") from None


# -- the end of a classification run ------------------------------------------------------------
def record_run_predictions(built: BuiltRun, loop, tracker) -> None:
    """The predictions of the run's best weights (those of ``best.pt``) on its val split (and
    its test split, where it has one), saved as ``predictions_<split>.npz`` and listed in
    ``metrics.json["predictions"]``. Rank 0 alone, after the last stage.

    When the last epoch is the best one, val's predictions come from the stage's own val
    inputs (the feature cache's, where the stage trained on cached features): a pass over
    stored features, not over the images. Otherwise ``best.pt`` is restored as
    ``transferlab-eval`` restores it and the images are read again."""
    best, final = tracker.best or {}, tracker.history[-1] if tracker.history else {}
    if not built.world.main or "epoch" not in best:
        return
    splits, ctx = built.splits, built.context
    # the weights in memory are best.pt's: the last epoch is the best and no early stop put
    # another epoch's weights back
    restored = any(s.get("restored") for s in tracker.extra.get("stopped_early") or [])
    is_last = best["epoch"] == final.get("epoch") and not restored
    model = built.model if is_last else _restored_best(built, tracker.run_dir)
    header = {"checkpoint": "best", "epoch": best["epoch"], "weights": "raw",
              "classes": [str(c) for c in splits.classes]}
    written = {}
    for split in ("val", "test"):
        dataset = getattr(splits, split)
        if dataset is None:
            continue
        if split == "val" and is_last and not built.world.active and loop.inputs is not None:
            on, loader = loop.inputs.model, loop.inputs.val  # in the val split's order
        else:
            on, loader = model, _ordered_loader(dataset, built)
        pred = predict(on, loader, ctx.device, ctx.precision, ctx.channels_last)
        identity = (built.data.get("identity") or {}).get(split)
        path = save_predictions(tracker.run_dir / predictions_file(split), pred,
                                {**header, "split": split, "identity": identity})
        written[split] = {"file": path.name, "epoch": best["epoch"], "samples": len(pred.targets),
                          "accuracy": pred.accuracy}
    tracker.extra["predictions"] = written
    log.info("predictions of best.pt (epoch %d): %s", best["epoch"],
             ", ".join(f"{s} acc {w['accuracy']:.4f} -> {w['file']}" for s, w in written.items()))


def _ordered_loader(dataset, built: BuiltRun):
    from torch.utils.data import DataLoader

    from transferlab.data import eval_batch_size, loader_workers

    return DataLoader(dataset, batch_size=eval_batch_size(built.run.trainer), shuffle=False,
                      num_workers=loader_workers(built.run.trainer),
                      pin_memory=built.device.type == "cuda")


def _restored_best(built: BuiltRun, run_dir: Path) -> nn.Module:
    """``best.pt``'s raw weights in a model of their own, on the run's device."""
    from transferlab.infra.checkpoint import load_checkpoint
    from transferlab.run.saved import checkpoint_config, restore_saved

    path = run_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(path)
    model, _, _ = restore_saved(checkpoint_config(ckpt), ckpt, path, "raw",
                                len(built.splits.classes))
    model.to(built.device)
    if built.channels_last:
        import torch

        model.to(memory_format=torch.channels_last)
    return model
