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

import contextlib
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
class BestWeights:
    """The best epoch's weights so far within the current stage, kept on the CPU: the
    tensors a stage can change (its trainable parameters and every buffer) of the model its
    val pass scores (``loop.inputs.model``: after the feature cache's cut, where the stage
    trains on cached features). Within a stage nothing else moves (the freeze ledger checks
    it), so these and the stage's own val inputs reproduce the best epoch's val pass."""

    def __init__(self):
        self.stage: int | None = None
        self.epoch: int | None = None
        self.state: dict | None = None

    def keep(self, loop) -> None:
        model = loop.inputs.model
        changing = ({n for n, p in model.named_parameters() if p.requires_grad}
                    | {n for n, _ in model.named_buffers()})
        self.state = {k: v.detach().to("cpu", copy=True)
                      for k, v in model.state_dict().items() if k in changing}
        self.stage, self.epoch = loop.plan.index, loop.epoch

    def of(self, loop, epoch: int) -> dict | None:
        """The kept weights when they are ``epoch``'s, of the stage ``loop`` ends in."""
        if self.state is None or self.epoch != epoch or loop.plan is None:
            return None
        return self.state if self.stage == loop.plan.index else None


@contextlib.contextmanager
def swapped_in(model: nn.Module, state: dict | None):
    """``model`` with ``state`` (some of its tensors) loaded for the block, then its own
    tensors back; nothing changes for ``state=None``."""
    if state is None:
        yield
        return
    own = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
           if k in state}
    model.load_state_dict(state, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(own, strict=False)


def record_run_predictions(built: BuiltRun, loop, tracker, kept: BestWeights,
                           with_best: Callable[[nn.Module], None] | None = None) -> None:
    """The predictions of the run's best weights (those of ``best.pt``) on its val split (and
    its test split, where it has one), saved as ``predictions_<split>.npz`` and listed in
    ``metrics.json["predictions"]``. Rank 0 alone, after the last stage. ``with_best(model)``
    is then called with the whole model holding those weights, in eval mode.

    When the best epoch is in the last stage (the last epoch, or one ``kept`` holds), val's
    predictions come from that stage's own val inputs (the feature cache's, where the stage
    trained on cached features): a pass over stored features, not over the images. Otherwise
    (and under DDP, whose val inputs are shared out) ``best.pt`` is restored as
    ``transferlab-eval`` restores it and the images are read again."""
    best, final = tracker.best or {}, tracker.history[-1] if tracker.history else {}
    if not built.world.main or "epoch" not in best:
        return
    # the weights in memory are best.pt's: the last epoch is the best and no early stop put
    # another epoch's weights back
    restored = any(s.get("restored") for s in tracker.extra.get("stopped_early") or [])
    in_memory = best["epoch"] == final.get("epoch") and not restored
    state = None if in_memory or built.world.active else kept.of(loop, best["epoch"])
    own_inputs = (in_memory or state is not None) and not built.world.active
    with swapped_in(loop.inputs.model if state is not None else built.model, state):
        model = built.model if in_memory or state is not None else _restored_best(
            built, tracker.run_dir)
        written = {split: _split_predictions(built, split, model,
                                             loop.inputs if own_inputs and split == "val"
                                             else None, tracker.run_dir, best["epoch"])
                   for split in ("val", "test") if getattr(built.splits, split) is not None}
        if with_best is not None:  # e.g. the grid of val's misclassified images
            with_best(model)
    tracker.extra["predictions"] = written
    log.info("predictions of best.pt (epoch %d): %s", best["epoch"],
             ", ".join(f"{s} acc {w['accuracy']:.4f} -> {w['file']}" for s, w in written.items()))


def _split_predictions(built: BuiltRun, split: str, model: nn.Module, inputs, run_dir: Path,
                       epoch: int) -> dict[str, Any]:
    """One split's predictions file: by ``inputs`` (a stage's model and val loader, in the val
    split's order) where given, else by ``model`` over the split's images."""
    ctx = built.context
    if inputs is not None:
        pred = predict(inputs.model, inputs.val, ctx.device, ctx.precision, ctx.channels_last)
    else:
        pred = predict(model, _ordered_loader(getattr(built.splits, split), built), ctx.device,
                       ctx.precision, ctx.channels_last)
    header = {"checkpoint": "best", "epoch": epoch, "weights": "raw", "split": split,
              "classes": [str(c) for c in built.splits.classes],
              "identity": (built.data.get("identity") or {}).get(split)}
    path = save_predictions(run_dir / predictions_file(split), pred, header)
    return {"file": path.name, "epoch": epoch, "samples": len(pred.targets),
            "accuracy": pred.accuracy}


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
