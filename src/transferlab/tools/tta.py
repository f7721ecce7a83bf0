"""Test-time augmentation (TTA) for ``transferlab-eval`` and ``transferlab-predict`` (``tta=``).

Each image becomes V views; the model sees all of them, and the prediction is the mean of the
views' softmax probabilities (its log for the loss):

* ``none``: the eval preprocessing (resize the short side to ``size / crop_pct``, centre-crop
  ``size``); 1 view, exactly the prediction without TTA;
* ``flip``: that view and its horizontal mirror; 2 views;
* ``five_crop``: resize the short side to ``size / crop_pct`` (the eval resize), then the four
  corner crops and the centre crop of ``size`` (torchvision ``FiveCrop``); 5 views;
* ``ten_crop``: the five crops and their horizontal mirrors (torchvision ``TenCrop``: the five
  crops of the mirrored image); 10 views.

:func:`views_transform` maps an image to a ``(V, C, H, W)`` tensor, so a DataLoader's batches
are ``(B, V, C, H, W)``; :func:`mean_log_probs` runs the model on them and averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchvision.transforms import v2 as T

from transferlab.backbones import InputSpec
from transferlab.choices import TTA_MODES
from transferlab.data.transforms import eval_transform

VIEWS = {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10}


def describe(mode: str) -> str:
    """``tta=flip: probabilities averaged over 2 views per image`` (for reports and output);
    ``tta=none`` without TTA."""
    if mode == "none":
        return "tta=none"
    return f"tta={mode}: probabilities averaged over {VIEWS[mode]} views per image"


class Views:
    """``image -> (V, C, H, W)``: the ``mode``'s views of one image, preprocessed."""

    def __init__(self, mode: str, spec: InputSpec, image_size: int,
                 crop_pct: float | None = None):
        if mode not in VIEWS:
            raise ValueError(f"unknown TTA mode {mode!r}: one of {', '.join(TTA_MODES)}")
        self.mode, self.spec, self.image_size, self.crop_pct = mode, spec, image_size, crop_pct
        base = eval_transform(spec, image_size, crop_pct)  # ToImage, Resize, CenterCrop, tail
        if mode in ("none", "flip"):
            self.transform: Callable = base
        else:
            crops = T.FiveCrop(image_size) if mode == "five_crop" else T.TenCrop(image_size)
            self.transform = T.Compose([*base.transforms[:2], crops, *base.transforms[3:]])

    def __call__(self, image) -> torch.Tensor:
        out = self.transform(image)
        if self.mode == "none":
            return out.unsqueeze(0)
        if self.mode == "flip":
            return torch.stack([out, out.flip(-1)])
        return torch.stack(list(out))

    def __repr__(self) -> str:
        return f"Views({self.mode!r}, {self.transform!r})"


def views_transform(mode: str, spec: InputSpec, image_size: int,
                    crop_pct: float | None = None) -> Views:
    """The transform of ``mode``: an image to its ``(V, C, H, W)`` views."""
    return Views(mode, spec, image_size, crop_pct)


def average_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``(B, V, K)`` logits -> ``(B, K)``: the log of the views' mean softmax probabilities.

    With one view this is ``log_softmax`` of its logits (so the loss and argmax are those of
    no TTA); otherwise ``logsumexp_v log_softmax - log V``, stable where probabilities are tiny.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logits.shape[1] == 1:
        return logp[:, 0]
    return torch.logsumexp(logp, dim=1) - math.log(logits.shape[1])


def mean_log_probs(model: nn.Module, views: torch.Tensor,
                   memory_format: torch.memory_format = torch.contiguous_format
                   ) -> torch.Tensor:
    """Run ``model`` on a ``(B, V, C, H, W)`` batch of views (on the model's device already);
    ``(B, K)`` log mean probabilities (float32)."""
    b, v = views.shape[:2]
    flat = views.flatten(0, 1).contiguous(memory_format=memory_format)
    logits = model(flat)
    return average_log_probs(logits.reshape(b, v, -1))
