"""Backbones: build one from its config, with blocks, input spec and feature shape."""

from __future__ import annotations

from collections.abc import Callable

from transferlab.backbones.base import Backbone, Block, InputSpec, probe_features
from transferlab.backbones.conv_encoder import build_conv_encoder
from transferlab.backbones.timm_zoo import build_efficientnet_lite0_package, build_timm
from transferlab.backbones.torchvision_zoo import build_torchvision
from transferlab.config import BackboneConfig
from transferlab.errors import UserError

SOURCES: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "torchvision": build_torchvision,
    "timm": build_timm,
    "efficientnet_lite0_package": build_efficientnet_lite0_package,
    "transferlab": build_conv_encoder,  # conv_encoder: the autoencoder's encoder
}
ARCHITECTURE_FIELDS = ("channels", "latent_dim", "image_size")  # source transferlab only


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named by ``cfg`` (pretrained or randomly initialised)."""
    try:
        builder = SOURCES[cfg.source]
    except KeyError:
        raise UserError(
            f"unknown backbone.source {cfg.source!r}; choose one of {', '.join(SOURCES)}"
        ) from None
    if cfg.source != "transferlab":
        given = [f for f in ARCHITECTURE_FIELDS if getattr(cfg, f) is not None]
        if given:
            raise UserError(f"backbone.{given[0]} applies to backbone.source=transferlab "
                            f"(conv_encoder) only, not {cfg.source}: remove it")
    return builder(cfg)


__all__ = ["Backbone", "Block", "InputSpec", "SOURCES", "build_backbone", "probe_features"]
