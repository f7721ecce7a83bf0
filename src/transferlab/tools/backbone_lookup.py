"""A backbone's config from the name a user types on a command line (``backbone=<name>`` of
``transferlab-predict`` and ``transferlab-blocks``): a preset of ``conf/backbone``, else a
torchvision or timm model name."""

from __future__ import annotations

import dataclasses
from importlib import resources

from transferlab.config import BackboneConfig, compose_config, load_config
from transferlab.config.typed import typed_object
from transferlab.errors import UserError, did_you_mean
from transferlab.infra.imports import import_timm
from transferlab.registry import BACKBONE_SOURCES


def preset_config(name: str) -> BackboneConfig | None:
    """The backbone preset ``conf/backbone/<name>.yaml``, if there is one."""
    preset = resources.files("transferlab.conf") / "backbone" / f"{name}.yaml"
    if not preset.is_file():
        return None
    return load_config(compose_config([f"backbone={name}"])).backbone


def _backbone_of(name: str, source: str) -> BackboneConfig:
    """A pretrained model ``name`` of ``source`` with its schema's defaults."""
    return BACKBONE_SOURCES.schema_of(source)(name=name, source=source)


def backbone_config(name: str, source: str | None,
                    fields: dict | None = None) -> BackboneConfig:
    """A pretrained backbone by preset name, or a torchvision / timm model name; ``fields``
    (``backbone.<field>=`` on a command line) change its config, checked by its schema."""
    cfg = _named(name, source)
    if fields:
        cfg = typed_object(type(cfg), {**dataclasses.asdict(cfg), **fields}, "backbone")
    return cfg


def _named(name: str, source: str | None) -> BackboneConfig:
    if source is not None:
        return _backbone_of(name, source)
    preset = preset_config(name)
    if preset is not None:
        return dataclasses.replace(preset, pretrained=True)
    from torchvision import models as tvm

    timm = import_timm()

    torchvision_names = tvm.list_models(module=tvm)
    if name in torchvision_names:
        return _backbone_of(name, "torchvision")
    if timm.is_model(name):
        return _backbone_of(name, "timm")
    presets = [p.name[:-5] for p in (resources.files("transferlab.conf") / "backbone").iterdir()
               if p.name.endswith(".yaml")]
    raise UserError(
        f"unknown backbone {name!r}{did_you_mean(name, [*presets, *torchvision_names])}: give a "
        f"preset ({', '.join(sorted(presets))}), a torchvision or a timm model name"
    )
