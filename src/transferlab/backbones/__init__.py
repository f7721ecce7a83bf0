"""Backbones: build one from its config, with blocks, input spec and feature shape. The
sources (torchvision, timm, an installed weights package, transferlab's own conv encoder) are
registered in :func:`transferlab.registry.load_builtins`."""

from __future__ import annotations

from transferlab.backbones.base import Backbone, Block, InputSpec, probe_features
from transferlab.backbones.segments import cut_after
from transferlab.config.schema import BackboneConfig
from transferlab.registry import BACKBONE_SOURCES


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named by ``cfg`` (pretrained or randomly initialised), cut after
    ``cfg.cut`` when it names a block."""
    backbone = BACKBONE_SOURCES.builder(cfg.source)(cfg)
    return backbone if cfg.cut is None else cut_after(backbone, str(cfg.cut))


__all__ = ["Backbone", "Block", "InputSpec", "build_backbone", "probe_features"]
