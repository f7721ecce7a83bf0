"""``transferlab-eval``'s pictures of the mistakes: the grid of the evaluated split's
misclassified images (:mod:`transferlab.run.mistakes`) from the ``eval_predictions.npz`` the
evaluation just wrote, with the checkpoint's model for the Grad-CAM overlays:
``eval_mistakes.png`` and TensorBoard's ``eval/<split>/mistakes``."""

from __future__ import annotations

from pathlib import Path

from transferlab.infra.checkpoint import load_checkpoint
from transferlab.infra.runtime import pick_device
from transferlab.run.mistakes import mistakes_grid, save_grid
from transferlab.run.predictions import EVAL_PREDICTIONS, load_predictions
from transferlab.run.saved import checkpoint_config, checkpoint_path, restore_saved
from transferlab.tools.evaluate import EvalArgs, eval_dataset, tb_tag

EVAL_MISTAKES = "eval_mistakes.png"


def eval_mistakes(args: EvalArgs, epoch: int | None) -> Path:
    """``eval_mistakes.png`` of the evaluation ``args`` describes (its images without TTA's
    views), and the same grid in the run's TensorBoard; its path."""
    path = checkpoint_path(args.run, args.checkpoint)
    ckpt = load_checkpoint(path)
    run = checkpoint_config(ckpt, args.dataset)
    classes = [str(c) for c in ckpt.get("classes") or []]
    model, backbone, image_size = restore_saved(run, ckpt, path, args.weights, len(classes))
    device = pick_device(args.device or run.trainer.device)
    model.to(device)
    dataset = eval_dataset(run, backbone, image_size, args.split, classes)
    pred = load_predictions(args.run / EVAL_PREDICTIONS)
    with_tta = "" if args.tta == "none" else f", tta={args.tta}"
    grid = mistakes_grid(model, backbone, dataset, pred, classes, device,
                         f"{args.checkpoint}.pt (epoch {epoch}) on {args.split}{with_tta}")
    out = save_grid(grid, args.run / EVAL_MISTAKES)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(args.run / "tb"))
    try:
        writer.add_image(f"eval/{tb_tag(args.split, args.tta)}/mistakes", grid.image, epoch or 0,
                         dataformats="HWC")
    finally:
        writer.close()
    return out
