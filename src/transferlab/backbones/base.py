"""What every backbone reports: its module, blocks, expected input and feature shape."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from transferlab.errors import UserError


@dataclass(frozen=True)
class InputSpec:
    """The input a backbone's weights expect (from the weights' metadata)."""

    size: int  # square side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest
    crop_pct: float = 0.875  # eval: resize to size / crop_pct, then centre-crop size
    min_size: int = 1  # smallest side the architecture accepts
    fixed_size: bool = False  # the architecture accepts only `size`


@dataclass(frozen=True)
class Block:
    """A named, ordered part of a backbone: the unit that freeze policies talk about.

    ``paths`` are module or parameter paths relative to the backbone module; a parameter
    belongs to the block when its name equals a path or starts with ``path + "."``.
    """

    name: str
    paths: tuple[str, ...]

    def owns(self, param_name: str) -> bool:
        return any(param_name == p or param_name.startswith(p + ".") for p in self.paths)


@dataclass
class Backbone:
    """A feature extractor and its metadata.

    ``module(x)`` maps a batch of images (B, 3, H, W) to features: an unpooled map
    (B, C, h, w) for convolutional networks, or a pooled vector (B, D) for token models.
    """

    name: str
    module: nn.Module
    blocks: list[Block]
    input: InputSpec
    pretrained: bool
    categories: list[str] | None = None  # class names of the pretrained classifier
    imagenet_head: nn.Module | None = None  # the pretrained classifier (features -> logits)
    feature_shape: tuple[int, ...] = field(default=())  # filled in by probe_features
    weights: str = "random initialisation"  # where the weights came from (logged by the run)
    # The fingerprints of its weights as built, by module key, when they can be built again
    # from the config (a run's build sets them: transferlab.backbones.source.record_source)
    source: dict[str, str] | None = None

    @property
    def feature_dim(self) -> int:
        """Channels of the feature map (or length of the feature vector)."""
        return self.feature_shape[0]

    def block_of(self, param_name: str) -> Block | None:
        for block in self.blocks:
            if block.owns(param_name):
                return block
        return None


def check_blocks_cover(backbone: Backbone) -> None:
    """Every parameter of the backbone belongs to exactly one block (a build-time invariant)."""
    for name, _ in backbone.module.named_parameters():
        owners = [b.name for b in backbone.blocks if b.owns(name)]
        if len(owners) != 1:
            raise AssertionError(f"{backbone.name}: parameter {name} is in blocks {owners}")


def probe_features(backbone: Backbone, image_size: int) -> tuple[int, ...]:
    """Run one blank image through the backbone to check the size and learn the feature shape.

    Raises a one-line :class:`UserError` when the architecture cannot take ``image_size``.
    """
    spec = backbone.input
    hint = f"set dataset.image_size to at least {max(spec.min_size, 32)}"
    if spec.fixed_size and image_size != spec.size:
        raise UserError(
            f"backbone {backbone.name} accepts only {spec.size}x{spec.size} images, got "
            f"{image_size}x{image_size}: set dataset.image_size={spec.size}"
        )
    if image_size < spec.min_size:
        raise UserError(
            f"image size {image_size}x{image_size} is below the minimum of backbone "
            f"{backbone.name} ({spec.min_size}x{spec.min_size}): {hint}"
        )
    out = _forward(backbone, image_size, hint)
    if out.ndim == 4 and min(out.shape[-2:]) < 1:
        raise UserError(f"image size {image_size} leaves no spatial features in "
                        f"{backbone.name}: {hint}")
    if out.ndim == 4 and image_size < spec.size:
        # An image smaller than the network's total stride (32 for most ImageNet CNNs) still
        # gives a 1x1 map, made mostly of padding: training "works" at chance accuracy.
        native = _forward(backbone, spec.size, hint)
        stride = max(1, round(spec.size / native.shape[-1]))
        if image_size < stride:
            raise UserError(
                f"image size {image_size}x{image_size} is below the minimum of backbone "
                f"{backbone.name} ({stride}x{stride}, its total stride): set "
                f"dataset.image_size to at least {stride}")
    backbone.feature_shape = tuple(out.shape[1:])
    return backbone.feature_shape


def _forward(backbone: Backbone, image_size: int, hint: str) -> torch.Tensor:
    """The features of one blank image (eval mode, no gradients); a size the architecture
    cannot take is a one-line error."""
    module = backbone.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"backbone {backbone.name} cannot process {image_size}x{image_size} images "
            f"({first}): {hint}"
        ) from None
    finally:
        module.train(was_training)
