"""Pictures of the mistakes (:mod:`transferlab.run.mistakes`): a run's ``mistakes.png`` shows
exactly its first misclassified val images, and Grad-CAM overlays where the feature map allows
and grad-cam is installed; ``transferlab-eval`` draws the same grid for its split."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from transferlab.cli.evaluate import main as eval_main
from transferlab.run.mistakes import (
    EXTRA_HINT,
    MIN_CAM_SIDE,
    MIN_TILE,
    SHOWN,
    tile_boxes,
    why_no_cam,
)
from transferlab.run.predictions import EVAL_PREDICTIONS, load_predictions


def test_no_cam_for_token_features_or_maps_too_coarse_to_show_anything():
    side = MIN_CAM_SIDE
    assert why_no_cam(SimpleNamespace(feature_shape=(8, side, side))) is None
    assert "not a spatial map" in why_no_cam(SimpleNamespace(feature_shape=(8,)))
    coarse = why_no_cam(SimpleNamespace(feature_shape=(8, side - 1, side + 4)))
    assert f"{side - 1}x{side + 4}" in coarse and "dataset.image_size" in coarse


def saved_model(run_dir, dataset=None):
    """The run's best.pt model, its backbone and val split, as transferlab-eval rebuilds them
    (with ``dataset.*`` overrides)."""
    from transferlab.infra.checkpoint import load_checkpoint
    from transferlab.run.saved import checkpoint_config, restore_saved
    from transferlab.tools.evaluate import eval_dataset

    path = run_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(path)
    run = checkpoint_config(ckpt, dataset)
    model, backbone, size = restore_saved(run, ckpt, path, "raw", len(ckpt["classes"]))
    return model, backbone, eval_dataset(run, backbone, size, "val", ckpt["classes"])


def tile_pixels(png, boxes, size):
    """Each tile's image region of ``png``, scaled back to ``size`` px: (N, size, size, 3)."""
    image = Image.open(png).convert("RGB")
    return np.stack([np.asarray(image.crop(box).resize((size, size), Image.Resampling.BOX),
                                np.float32) / 255 for box in boxes])


@pytest.mark.slow
def test_the_grid_shows_exactly_the_first_misclassified_val_images(tiny_run):
    from transferlab.run.mistakes import to_rgb

    pred = load_predictions(tiny_run / "predictions_val.npz")
    wrong = np.flatnonzero(pred.targets != pred.predicted)
    record = json.loads((tiny_run / "metrics.json").read_text())["mistakes"]
    assert record["wrong"] == len(wrong) > SHOWN  # the tiny run gets many wrong: 16 shown
    assert record["shown"] == wrong[:SHOWN].tolist()
    assert record["overlay"] is None  # a 32 px test model's last map is 1x1: no CAM
    _, backbone, val = saved_model(tiny_run)
    import torch

    every = to_rgb(torch.stack([val[i][0] for i in range(len(val))]), backbone.input.mean,
                   backbone.input.std)
    size = every.shape[1]
    tiles = tile_pixels(tiny_run / "mistakes.png", tile_boxes(SHOWN, max(MIN_TILE, size)), size)
    # each tile is the val image it says, not another: the nearest of all 360
    distance = ((tiles[:, None] - every[None]) ** 2).mean(axis=(2, 3, 4))
    assert distance.argmin(axis=1).tolist() == record["shown"]
    assert distance.min(axis=1).max() < 1e-3


@pytest.mark.slow
def test_eval_draws_grad_cam_overlays_that_differ_from_the_raw_images(tiny_run):
    pytest.importorskip("pytorch_grad_cam")
    import torch

    from transferlab.run.mistakes import mistakes_grid

    # the test model's map at 96 px: 3x3; a val split of 90 images (5 %), for speed
    dataset = {"image_size": 32 * MIN_CAM_SIDE, "val_fraction": 0.05}
    assert eval_main([f"run={tiny_run}", *(f"dataset.{k}={v}" for k, v in dataset.items()),
                      "device=cpu", "mistakes=true"]) == 0
    pred = load_predictions(tiny_run / EVAL_PREDICTIONS)
    model, backbone, val = saved_model(tiny_run, dataset)
    classes = pred.header["classes"]
    heading = f"best.pt (epoch {pred.header['epoch']}) on val"
    cam = mistakes_grid(model, backbone, val, pred, classes, torch.device("cpu"), heading)
    raw = mistakes_grid(model, backbone, val, pred, classes, torch.device("cpu"), heading,
                        cam=False)
    assert cam.overlay.startswith("Grad-CAM") and raw.overlay is None
    assert cam.shown == raw.shown == np.flatnonzero(pred.targets != pred.predicted)[:16].tolist()
    written = np.asarray(Image.open(tiny_run / "eval_mistakes.png").convert("RGB"))
    assert np.array_equal(written, cam.image)  # transferlab-eval wrote this grid
    for left, top, right, bottom in cam.boxes:
        a = cam.image[top:bottom, left:right].astype(np.float32)
        b = raw.image[top:bottom, left:right].astype(np.float32)
        change = np.abs(a - b).mean(axis=2)
        assert change.mean() > 10  # an overlay, visibly
        assert change.std() > 1  # and not one tint over the whole image: it has a where


@pytest.mark.slow
def test_without_grad_cam_the_grid_is_drawn_plain_and_one_line_says_which_extra(
        tiny_run, monkeypatch, caplog):
    import torch

    from transferlab.run.mistakes import mistakes_grid

    for name in ("pytorch_grad_cam", "pytorch_grad_cam.utils.image"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    pred = load_predictions(tiny_run / "predictions_val.npz")
    model, backbone, val = saved_model(tiny_run, {"image_size": 32 * MIN_CAM_SIDE})
    with caplog.at_level(logging.INFO, logger="transferlab"):
        grid = mistakes_grid(model, backbone, val, pred, pred.header["classes"],
                             torch.device("cpu"), "best.pt on val")
    assert grid.overlay is None and len(grid.shown) == SHOWN
    lines = [r.getMessage() for r in caplog.records if "transferlab[vis]" in r.getMessage()]
    assert len(lines) == 1 and EXTRA_HINT in lines[0]
