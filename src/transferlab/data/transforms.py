"""Image transforms (torchvision.transforms.v2) that follow the backbone's expected input."""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from transferlab.backbones import InputSpec
from transferlab.config.schema import (
    AugmentConfig,
    CropFlipConfig,
    FlipConfig,
    RandAugmentConfig,
    StandardAugmentConfig,
    TrivialAugmentConfig,
)
from transferlab.errors import UserError
from transferlab.registry import AUGMENTS

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


def eval_stages(spec: InputSpec, image_size: int,
                crop_pct: float | None = None) -> tuple[T.Compose, T.Compose]:
    """The eval transform in two: (image conversion, resize and centre crop: a uint8 image at
    the model's input size; scaling to [0, 1] and normalisation), for work on the image
    in between (corruptions, :mod:`transferlab.tools.corruptions`)."""
    return T.Compose(_fixed(spec, image_size, crop_pct)), T.Compose(_tail(spec))


def train_transform(spec: InputSpec, image_size: int, augment: AugmentConfig,
                    crop_pct: float | None = None) -> T.Compose:
    """The training transform: ``none`` is the eval transform (best for frozen backbones)."""
    return AUGMENTS.builder(augment.name)(augment, spec, image_size, crop_pct)


def _fixed(spec: InputSpec, image_size: int, crop_pct: float | None) -> list:
    """The eval transform's image conversion, resize and centre crop."""
    return eval_transform(spec, image_size, crop_pct).transforms[:3]


def _none(augment: AugmentConfig, spec: InputSpec, image_size: int,
          crop_pct: float | None) -> T.Compose:
    return eval_transform(spec, image_size, crop_pct)


def _flip(augment: FlipConfig, spec: InputSpec, image_size: int,
          crop_pct: float | None) -> T.Compose:
    return T.Compose([*_fixed(spec, image_size, crop_pct), T.RandomHorizontalFlip(augment.hflip),
                      *_tail(spec)])


def _policy(policy, augment: FlipConfig, spec: InputSpec, image_size: int,
            crop_pct: float | None) -> T.Compose:
    # The policies work on uint8 images at the final size, then the flip and normalisation.
    return T.Compose([*_fixed(spec, image_size, crop_pct), policy,
                      T.RandomHorizontalFlip(augment.hflip), *_tail(spec)])


# (bilinear: the policies' geometric ops refuse bicubic on tensor images, which digits are)
def _randaugment(augment: RandAugmentConfig, spec: InputSpec, image_size: int,
                 crop_pct: float | None) -> T.Compose:
    policy = T.RandAugment(num_ops=augment.num_ops, magnitude=augment.magnitude,
                           interpolation=T.InterpolationMode.BILINEAR)
    return _policy(policy, augment, spec, image_size, crop_pct)


def _trivialaugment(augment: TrivialAugmentConfig, spec: InputSpec, image_size: int,
                    crop_pct: float | None) -> T.Compose:
    policy = T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR)
    return _policy(policy, augment, spec, image_size, crop_pct)


def _crop_flip(augment: CropFlipConfig, spec: InputSpec, image_size: int,
               crop_pct: float | None) -> T.Compose:
    interp = _INTERPOLATION.get(spec.interpolation, T.InterpolationMode.BILINEAR)
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(image_size, scale=(augment.scale_min, 1.0), interpolation=interp,
                            antialias=True),
        T.RandomHorizontalFlip(augment.hflip),
        *_tail(spec),
    ])


def _standard(augment: StandardAugmentConfig, spec: InputSpec, image_size: int,
              crop_pct: float | None) -> T.Compose:
    # Keras ImageDataGenerator(rotation_range=20, width/height_shift_range=0.2,
    # shear_range=0.2 (degrees), zoom_range=0.2, horizontal_flip=True, fill_mode="nearest"):
    # edge padding before the affine warp and a centre crop after it give the nearest fill.
    return T.Compose([
        *_fixed(spec, image_size, crop_pct),
        T.Pad(image_size // 2, padding_mode="edge"),
        T.RandomAffine(degrees=augment.rotation, translate=(augment.shift, augment.shift),
                       scale=(1 - augment.zoom, 1 + augment.zoom), shear=augment.shear,
                       interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(image_size),
        T.RandomHorizontalFlip(augment.hflip),
        *_tail(spec),
    ])
