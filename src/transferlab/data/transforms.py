"""Image transforms (torchvision.transforms.v2) that follow the backbone's expected input."""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from transferlab.backbones import InputSpec
from transferlab.config import AugmentConfig
from transferlab.errors import UserError

AUGMENTS = ("none", "flip", "crop_flip", "standard", "randaugment", "trivialaugment")

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def _tail(spec: InputSpec) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=spec.mean, std=spec.std)]


def eval_transform(spec: InputSpec, image_size: int, crop_pct: float | None = None) -> T.Compose:
    """Deterministic: resize the short side to ``size / crop_pct``, centre-crop, normalise."""
    crop_pct = spec.crop_pct if crop_pct is None else crop_pct
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"dataset.crop_pct must be in (0, 1], got {crop_pct}")
    interp = _INTERPOLATION.get(spec.interpolation, T.InterpolationMode.BILINEAR)
    resize = int(round(image_size / crop_pct))
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, interpolation=interp, antialias=True),
        T.CenterCrop(image_size),
        *_tail(spec),
    ])


def train_transform(spec: InputSpec, image_size: int, augment: AugmentConfig,
                    crop_pct: float | None = None) -> T.Compose:
    """The training transform: ``none`` is the eval transform (best for frozen backbones)."""
    if augment.name == "none":
        return eval_transform(spec, image_size, crop_pct)
    interp = _INTERPOLATION.get(spec.interpolation, T.InterpolationMode.BILINEAR)
    fixed = eval_transform(spec, image_size, crop_pct).transforms[:3]  # image, resize, crop
    if augment.name == "flip":
        return T.Compose([*fixed, T.RandomHorizontalFlip(augment.hflip), *_tail(spec)])
    if augment.name in ("randaugment", "trivialaugment"):
        # The policies work on uint8 images at the final size, then the flip and normalisation.
        # (bilinear: their geometric ops refuse bicubic on tensor images, which digits are)
        bilinear = T.InterpolationMode.BILINEAR
        if augment.name == "randaugment":
            policy = T.RandAugment(num_ops=augment.num_ops, magnitude=augment.magnitude,
                                   interpolation=bilinear)
        else:
            policy = T.TrivialAugmentWide(interpolation=bilinear)
        return T.Compose([*fixed, policy, T.RandomHorizontalFlip(augment.hflip), *_tail(spec)])
    if augment.name == "crop_flip":
        if not 0.0 < augment.scale_min <= 1.0:
            raise UserError(f"augment.scale_min must be in (0, 1], got {augment.scale_min}")
        return T.Compose([
            T.ToImage(),
            T.RandomResizedCrop(image_size, scale=(augment.scale_min, 1.0), interpolation=interp,
                                antialias=True),
            T.RandomHorizontalFlip(augment.hflip),
            *_tail(spec),
        ])
    if augment.name == "standard":
        # Keras ImageDataGenerator(rotation_range=20, width/height_shift_range=0.2,
        # shear_range=0.2 (degrees), zoom_range=0.2, horizontal_flip=True, fill_mode="nearest"):
        # edge padding before the affine warp and a centre crop after it give the nearest fill.
        pad = image_size // 2
        return T.Compose([
            *fixed,
            T.Pad(pad, padding_mode="edge"),
            T.RandomAffine(degrees=augment.rotation, translate=(augment.shift, augment.shift),
                           scale=(1 - augment.zoom, 1 + augment.zoom), shear=augment.shear,
                           interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(image_size),
            T.RandomHorizontalFlip(augment.hflip),
            *_tail(spec),
        ])
    raise UserError(f"unknown augment {augment.name!r}; choose one of {', '.join(AUGMENTS)}")
