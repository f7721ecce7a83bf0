"""Backbones: build one from its config, with blocks, input spec and feature shape. The
sources (torchvision, timm, an installed weights package, transferlab's own conv encoder) are
registered in :func:`transferlab.registry.load_builtins`."""

from __future__ import annotations

from transferlab.backbones.base import Backbone, Block, InputSpec, probe_features
from transferlab.config.schema import BackboneConfig
from transferlab.registry import BACKBONE_SOURCES


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named by ``cfg`` (pretrained or randomly initialised)."""
    return BACKBONE_SOURCES.builder(cfg.source)(cfg)


__all__ = ["Backbone", "Block", "InputSpec", "build_backbone", "probe_features"]
