"""Pictures of the mistakes: a grid of a split's misclassified images, each captioned with its
true and predicted class, under a class-activation overlay (Grad-CAM, from the ``grad-cam``
package, ``pip install "transferlab[vis]"``) of where the model looked for the class it
predicted. A classification run writes ``mistakes.png`` for its val split at its end (best.pt's
weights, beside ``predictions_val.npz``) and TensorBoard's ``eval/mistakes``;
``transferlab-eval`` writes ``eval_mistakes.png`` for the split it evaluates.

At most :data:`SHOWN` images, the first misclassified ones in the split's order: the CAM runs
on those alone. Without ``grad-cam`` the grid has no overlays and one log line says which extra
adds them. The grid is drawn with Pillow (no matplotlib), so a run's end stays cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from transferlab.backbones.base import Backbone, Block
    from transferlab.run.predictions import Predictions

log = logging.getLogger("transferlab")

MISTAKES_PNG = "mistakes.png"
SHOWN = 16  # at most this many images in a grid
COLUMNS = 4
MIN_TILE = 112  # smaller images are scaled up to this side (px)
PAD, CAPTION = 6, 34  # px between tiles; caption height under each image
TITLE = 40  # px of the title above the grid
CAM_NAME = "Grad-CAM"
MIN_CAM_SIDE = 3  # a coarser feature map says little about where the model looked
EXTRA_HINT = 'pip install "transferlab[vis]" adds Grad-CAM overlays (the grad-cam package)'


@dataclass
class MistakesGrid:
    """The drawn grid and what it shows: ``shown`` (indices into the split, in tile order),
    ``boxes`` (each tile's image region: left, top, right, bottom), how many images were
    wrong in all, and the overlay (None: none drawn)."""

    image: np.ndarray  # (H, W, 3) uint8
    shown: list[int]
    wrong: int
    overlay: str | None
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def record(self, file: str, split: str) -> dict:
        return {"file": file, "split": split, "shown": self.shown, "wrong": self.wrong,
                "overlay": self.overlay}


def wrong_indices(pred: Predictions, limit: int = SHOWN) -> list[int]:
    """The first ``limit`` misclassified images, by their position in the split."""
    return [int(i) for i in np.flatnonzero(pred.targets != pred.predicted)[:limit]]


def target_layer(model: nn.Module, blocks: list[Block]) -> tuple[str, nn.Module] | None:
    """The backbone's last block that holds a convolution, by its last module (the block's
    output): (its name in ``model``, the module); None when no block has one."""
    from torch import nn

    for block in reversed(blocks):
        modules = []
        for path in block.paths:
            try:
                modules.append((path, model.backbone.get_submodule(path)))
            except AttributeError:  # a parameter path (a class token...), not a module
                continue
        if any(isinstance(m, nn.Conv2d) for _, module in modules for m in module.modules()):
            path, module = modules[-1]
            return f"backbone.{path}", module
    return None


def cam_masks(model: nn.Module, layer: nn.Module, images: torch.Tensor,
              device: torch.device) -> np.ndarray:
    """Grad-CAM of each image's predicted class at ``layer``: (N, H, W) in [0, 1]. The
    model's parameters do not require grad meanwhile (no gradient lands in them); the input
    does, so a frozen backbone's activations still have gradients."""
    from pytorch_grad_cam import GradCAM

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        x = images.to(device).requires_grad_(True)
        with GradCAM(model=model, target_layers=[layer]) as cam:
            return np.asarray(cam(input_tensor=x, targets=None), dtype=np.float32)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def why_no_cam(backbone: Backbone) -> str | None:
    """Why no overlay is drawn for ``backbone`` at the run's image size (None: one is): its
    features are no spatial map (a token model), or the map is under
    :data:`MIN_CAM_SIDE` px a side (then the CAM is a few cells; grad-cam, whose import
    takes about 2 s, is not even imported)."""
    shape = tuple(backbone.feature_shape)
    if len(shape) != 3:
        return "no overlay: the backbone's features are not a spatial map"
    if min(shape[1:]) < MIN_CAM_SIDE:
        return (f"no overlay: the last feature map is {shape[1]}x{shape[2]}, too coarse "
                f"(under {MIN_CAM_SIDE}x{MIN_CAM_SIDE}: raise dataset.image_size)")
    return None


def overlays(model: nn.Module, backbone: Backbone, images: torch.Tensor, rgb: np.ndarray,
             device: torch.device) -> tuple[np.ndarray | None, str]:
    """``rgb`` (N, H, W, 3 in [0, 1]) under each image's Grad-CAM, and the words that say
    what was drawn; (None, why not) when none can be drawn."""
    why = why_no_cam(backbone)
    if why is not None:
        return None, why
    try:
        from pytorch_grad_cam.utils.image import show_cam_on_image
    except ImportError:
        return None, f"no overlay: {EXTRA_HINT}"
    layer = target_layer(model, backbone.blocks)
    if layer is None:
        return None, "no overlay: the backbone has no convolutional block"
    try:
        masks = cam_masks(model, layer[1], images, device)
    except (RuntimeError, ValueError, IndexError) as exc:  # e.g. a block that outputs tokens
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"no overlay: {CAM_NAME} failed at {layer[0]} ({first[:120]})"
    drawn = np.stack([show_cam_on_image(img, mask, use_rgb=True, image_weight=0.55)
                      for img, mask in zip(rgb, masks, strict=True)])
    return drawn.astype(np.float32) / 255.0, f"{CAM_NAME} of the predicted class at {layer[0]}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: its bitmap font, one size
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def tile_boxes(n: int, side: int) -> list[tuple[int, int, int, int]]:
    """Where a grid of ``n`` tiles of ``side`` px puts each tile's image: (left, top, right,
    bottom), :data:`COLUMNS` a row under the title, each row's captions under its images."""
    boxes = []
    for k in range(n):
        left = PAD + (k % COLUMNS) * (side + PAD)
        top = TITLE + (k // COLUMNS) * (side + CAPTION + PAD)
        boxes.append((left, top, left + side, top + side))
    return boxes


def draw_grid(tiles: np.ndarray, captions: list[tuple[str, str]], title: tuple[str, str]
              ) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """The grid: ``tiles`` (N, H, W, 3 in [0, 1]) scaled up to at least :data:`MIN_TILE` px,
    :data:`COLUMNS` a row, each over its two caption lines (true, predicted), the two title
    lines above; the image and each tile's box."""
    from PIL import Image, ImageDraw

    n = len(tiles)
    side = max(MIN_TILE, tiles.shape[1] if n else MIN_TILE)
    cols, rows = max(1, min(COLUMNS, n)), max(1, -(-n // COLUMNS))
    width = max(cols * (side + PAD) + PAD, 560)
    canvas = Image.new("RGB", (width, TITLE + rows * (side + CAPTION + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(15), _font(12)
    draw.text((PAD, 4), _fit(draw, title[0], big, width - 2 * PAD), fill="black", font=big)
    draw.text((PAD, 22), _fit(draw, title[1], small, width - 2 * PAD), fill=(60, 60, 60),
              font=small)
    boxes = tile_boxes(n, side)
    for (left, top, _, _), tile, (truth, guess) in zip(boxes, tiles, captions, strict=True):
        image = Image.fromarray(np.clip(np.rint(tile * 255), 0, 255).astype(np.uint8))
        canvas.paste(image.resize((side, side), Image.Resampling.BILINEAR), (left, top))
        draw.text((left, top + side + 2), _fit(draw, truth, small, side), fill=(0, 110, 0),
                  font=small)
        draw.text((left, top + side + 17), _fit(draw, guess, small, side), fill=(190, 0, 0),
                  font=small)
    return canvas, boxes


def to_rgb(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (N, 3, H, W) images back to (N, H, W, 3) in [0, 1]."""
    import torch

    m = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)


def mistakes_grid(model: nn.Module, backbone: Backbone, dataset, pred: Predictions,
                  classes: list[str], device: torch.device, heading: str,
                  cam: bool = True) -> MistakesGrid:
    """The grid of ``pred``'s first misclassified images of ``dataset`` (the split ``pred``
    scored, in its order: eval transform, normalised tensors), with Grad-CAM overlays of
    ``model`` where ``cam`` and the package allow."""
    import torch

    shown = wrong_indices(pred)
    wrong = int((pred.targets != pred.predicted).sum())
    overlay, note = None, "no misclassified image" if not shown else "no overlay"
    tiles = np.zeros((0, MIN_TILE, MIN_TILE, 3), np.float32)
    if shown:
        images = torch.stack([dataset[i][0] for i in shown]).float()
        tiles = to_rgb(images, backbone.input.mean, backbone.input.std)
        if cam:
            drawn, note = overlays(model, backbone, images, tiles, device)
            if drawn is not None:
                tiles, overlay = drawn, note
            elif EXTRA_HINT in note:
                log.info("mistakes.png: %s", note)
    captions = [(f"true: {classes[pred.targets[i]]}",
                 f"pred: {classes[pred.predicted[i]]}  p(true) {pred.label_prob[i]:.2f}")
                for i in shown]
    title = (f"{heading}: {len(shown)} of {wrong} misclassified (of {len(pred.targets)} images)",
             note)
    image, boxes = draw_grid(tiles, captions, title)
    return MistakesGrid(np.asarray(image), shown, wrong, overlay, boxes)


def save_grid(grid: MistakesGrid, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(grid.image).save(path, optimize=False, compress_level=1)
    return path


def record_mistakes(built, model: nn.Module, tracker) -> None:
    """A run's end: ``mistakes.png`` of its val split from ``predictions_val.npz`` (best.pt's
    weights, which ``model`` holds), TensorBoard's ``eval/mistakes`` and
    ``metrics.json["mistakes"]``."""
    from transferlab.run.predictions import load_predictions, predictions_file

    pred = load_predictions(tracker.run_dir / predictions_file("val"))
    epoch = pred.header["epoch"]
    grid = mistakes_grid(model, built.backbone, built.splits.val, pred,
                         [str(c) for c in built.splits.classes], built.device,
                         f"best.pt (epoch {epoch}) on val")
    save_grid(grid, tracker.run_dir / MISTAKES_PNG)
    tracker.writer.add_image("eval/mistakes", grid.image, epoch, dataformats="HWC")
    tracker.extra["mistakes"] = grid.record(MISTAKES_PNG, "val")
