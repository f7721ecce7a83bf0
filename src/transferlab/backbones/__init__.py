"""Backbones: build one from its config, with blocks, input spec and feature shape."""

from __future__ import annotations

from collections.abc import Callable

from transferlab.backbones.base import Backbone, Block, InputSpec, probe_features
from transferlab.backbones.timm_zoo import build_efficientnet_lite0_package, build_timm
from transferlab.backbones.torchvision_zoo import build_torchvision
from transferlab.config import BackboneConfig
from transferlab.errors import UserError

SOURCES: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "torchvision": build_torchvision,
    "timm": build_timm,
    "efficientnet_lite0_package": build_efficientnet_lite0_package,
}


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named by ``cfg`` (pretrained or randomly initialised)."""
    try:
        builder = SOURCES[cfg.source]
    except KeyError:
        raise UserError(
            f"unknown backbone.source {cfg.source!r}; choose one of {', '.join(SOURCES)}"
        ) from None
    return builder(cfg)


__all__ = ["Backbone", "Block", "InputSpec", "SOURCES", "build_backbone", "probe_features"]
