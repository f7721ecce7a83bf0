"""A backbone's weights as its source gives them again: what a run's checkpoints may leave out.

Weights from the backbone's zoo or package (``backbone.pretrained=true``, no
``backbone.weights_path``) are built again, bit for bit, from the run's saved config. A run
fingerprints them right after the build, before ``backbone.init`` restores anything
(:func:`record_source`); :func:`weights_source` names them by the model's keys, which is
what a checkpoint leaves out where they did not change (:mod:`transferlab.infra.delta`).
Random weights (``pretrained=false``, a scratch run) and a user's weights file are no such
source: their checkpoints hold every tensor.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.backbones.base import Backbone
from transferlab.config.schema import BackboneConfig
from transferlab.errors import UserError
from transferlab.infra.checkpoint import read_file, state_dict_of
from transferlab.infra.delta import WeightsSource, complete, fingerprint, is_delta


def rebuildable(cfg: BackboneConfig) -> bool:
    """Whether the backbone's weights come from its zoo or package (built again from the
    config alone)."""
    return bool(cfg.pretrained) and not cfg.weights_path


def record_source(backbone: Backbone, cfg: BackboneConfig) -> None:
    """Fingerprint the just-built backbone's tensors (``backbone.source``), if its weights are
    :func:`rebuildable`."""
    if rebuildable(cfg):
        backbone.source = {name: fingerprint(t)
                           for name, t in backbone.module.state_dict().items()}


def plain_state(module: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s state dict by the names its tensors have without LoRA adapters: a LoRA
    layer (``freeze=lora``) holds the layer it adapts as its ``base_layer`` (peft's name)."""
    return {name.replace(".base_layer.", "."): t
            for name, t in module.state_dict(keep_vars=keep_vars).items()}


def weights_source(model: nn.Module, backbone: Backbone) -> WeightsSource | None:
    """The tensors of ``model`` that are the backbone's recorded ones (``backbone.source``),
    by the model's keys, or None (:func:`plain_state`: a LoRA layer's tensors are those of
    the layer it adapts)."""
    if not backbone.source:
        return None
    names = {id(t): name for name, t in plain_state(backbone.module, keep_vars=True).items()}
    tensors = {}
    for key, t in model.state_dict(keep_vars=True).items():
        name = names.get(id(t))
        if name is not None and name in backbone.source:
            tensors[key] = (name, backbone.source[name])
    return WeightsSource(tensors, backbone.weights) if tensors else None


def read_weights(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The named tensors of any weights file
    (:func:`~transferlab.infra.checkpoint.read_state_dict`); a transferlab checkpoint that
    left out its pretrained tensors has them built again from its config and checked."""
    obj = read_file(path, option)
    if is_delta(obj):
        where = f"{option} {path}"
        pretrained = rebuilt_pretrained(obj.get("config"), where)
        obj = {**obj, "model": complete(obj["model"], obj["source"], pretrained, where)}
    return state_dict_of(obj, path, option)


def rebuilt_pretrained(config: Any, where: str) -> dict[str, torch.Tensor]:
    """The state dict of the pretrained backbone a run's saved ``config`` builds (without its
    ``backbone.init``)."""
    from transferlab.backbones import build_backbone
    from transferlab.config import load_config

    if not isinstance(config, dict) or not isinstance(config.get("backbone"), dict):
        raise UserError(f"{where}: the checkpoint left out its pretrained tensors but holds no "
                        "run config to build them from")
    raw = copy.deepcopy(config)
    if isinstance(raw["backbone"].get("init"), dict):
        raw["backbone"]["init"]["path"] = None
    return build_backbone(load_config(raw).backbone).module.state_dict()
