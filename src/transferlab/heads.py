"""Classifier heads put on a backbone's features."""

from __future__ import annotations

import math

import torch
from torch import nn

from transferlab.config.schema import HeadBase, HeadConfig
from transferlab.errors import UserError
from transferlab.registry import HEADS


class GlobalPool(nn.Module):
    """Average over the spatial dims of a (B, C, h, w) map; (B, D) vectors pass through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1)


class FlattenDense(nn.Module):
    """Flatten -> Linear (Keras' Flatten + Dense): needs the feature shape it was built for."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, dropout: float):
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(math.prod(feature_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.feature_shape:
            raise UserError(
                f"head=flatten_dense was built for features of shape {self.feature_shape} but got "
                f"{tuple(x.shape[1:])}: feed images of the size it was built for "
                "(dataset.image_size) or use head=linear"
            )
        return self.fc(self.dropout(x.flatten(1)))


def _linear(cfg: HeadConfig, feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Global average pool -> (Dropout) -> Linear."""
    return nn.Sequential(GlobalPool(), _dropout(cfg), nn.Linear(feature_shape[0], num_classes))


def _mlp(cfg: HeadConfig, feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Global average pool -> BatchNorm -> Dropout -> Linear (Keras' GAP-BN-Dropout-Dense)."""
    channels = feature_shape[0]
    return nn.Sequential(GlobalPool(), nn.BatchNorm1d(channels), _dropout(cfg),
                         nn.Linear(channels, num_classes))


def _flatten_dense(cfg: HeadConfig, feature_shape: tuple[int, ...],
                   num_classes: int) -> nn.Module:
    return FlattenDense(feature_shape, num_classes, cfg.dropout)


def _dropout(cfg: HeadConfig) -> nn.Module:
    return nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()


def build_head(cfg: HeadBase, feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The head ``cfg.name`` for backbone features of ``feature_shape`` (C, h, w) or (D,)."""
    build = HEADS.builder(cfg.name)
    if isinstance(cfg, HeadConfig) and not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"head.dropout must be in [0, 1), got {cfg.dropout}")
    return build(cfg, tuple(feature_shape), num_classes)
