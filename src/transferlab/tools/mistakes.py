"""``transferlab-eval``'s pictures of the mistakes: the grid of the evaluated split's
misclassified images (:mod:`transferlab.run.mistakes`), drawn with the model, data and
predictions the evaluation already has, with the Grad-CAM overlays: ``eval_mistakes.png`` and
TensorBoard's ``eval/<split>/mistakes``."""

from __future__ import annotations

from pathlib import Path

from transferlab.run.mistakes import mistakes_grid, save_grid
from transferlab.run.predictions import Predictions
from transferlab.tools.robustness import Evaluated

EVAL_MISTAKES = "eval_mistakes.png"


def eval_mistakes(run_dir: Path, done: Evaluated, dataset, pred: Predictions, heading: str,
                  tag: str) -> Path:
    """``eval_mistakes.png`` of an evaluation (``done``, its predictions ``pred`` of
    ``dataset``: the split's images without TTA's views), and the same grid in the run's
    TensorBoard; its path."""
    import torch

    # the CAM of the model as the checkpoint restores it (a channels-last copy's gradients
    # differ in the last bits), then back as the evaluation scores it
    model = done.model.to(memory_format=torch.contiguous_format)
    try:
        grid = mistakes_grid(model, done.backbone, dataset, pred, done.classes,
                             done.scorer.device, heading)
    finally:
        if done.scorer.channels_last:
            model.to(memory_format=torch.channels_last)
    out = save_grid(grid, run_dir / EVAL_MISTAKES)
    from torch.utils.tensorboard import SummaryWriter

    epoch = done.ckpt.get("epoch")
    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    try:
        writer.add_image(f"eval/{tag}/mistakes", grid.image, epoch or 0, dataformats="HWC")
    finally:
        writer.close()
    return out
