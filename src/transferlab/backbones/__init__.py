"""Backbones: build one from its config, with blocks, input spec and feature shape."""

from __future__ import annotations

from transferlab.backbones.base import Backbone, Block, InputSpec, probe_features
from transferlab.backbones.conv_encoder import build_conv_encoder
from transferlab.backbones.timm_zoo import build_efficientnet_lite0_package, build_timm
from transferlab.backbones.torchvision_zoo import build_torchvision
from transferlab.config.schema import BackboneConfig, ConvEncoderConfig, TorchvisionBackboneConfig
from transferlab.registry import BACKBONE_SOURCES

BACKBONE_SOURCES.register("torchvision", TorchvisionBackboneConfig, build_torchvision)
BACKBONE_SOURCES.register("timm", BackboneConfig, build_timm)
BACKBONE_SOURCES.register("efficientnet_lite0_package", BackboneConfig,
                          build_efficientnet_lite0_package)
BACKBONE_SOURCES.register("transferlab", ConvEncoderConfig, build_conv_encoder)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named by ``cfg`` (pretrained or randomly initialised)."""
    return BACKBONE_SOURCES.builder(cfg.source)(cfg)


__all__ = ["Backbone", "Block", "InputSpec", "build_backbone", "probe_features"]
