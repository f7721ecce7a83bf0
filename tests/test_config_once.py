"""Defaults once: a conf/ YAML holds its defaults line and only the values that differ from its
schema (the dataclass holds the default); composing nothing, so it is in the fast tier."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from transferlab.config import RunConfig
from transferlab.config.load import option_layers
from transferlab.config.schema import GROUPS

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIONS = [(g, p.stem) for g in sorted(GROUPS) for p in sorted((CONF / g).glob("*.yaml"))]


def _filled(node: Any) -> Any:
    """A dataclass node that is null or ??? in the schema, as its type's defaults."""
    if isinstance(node, DictConfig) and (node._is_none() or node._is_missing()):
        return OmegaConf.structured(node._metadata.ref_type)
    return node


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=False)
    return node._value()


def _same(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):  # true is not 1
        return default is value
    return default == value


def repeats(base: DictConfig, own: dict, where: str) -> Iterator[str]:
    """``key: value`` of every value of ``own`` that equals the schema's (``base``) default."""
    for key, value in own.items():
        if key not in base.keys() or (isinstance(value, str) and "${" in value):
            continue  # an unknown key fails at composition; interpolations stay in the YAML
        node, path = base._get_node(key), f"{where}.{key}"
        if isinstance(value, dict) and value and isinstance(node, DictConfig):
            yield from repeats(_filled(node), value, path)
        elif isinstance(value, list) and isinstance(node, ListConfig) \
                and dataclasses.is_dataclass(node._metadata.element_type):
            item_schema = OmegaConf.structured(node._metadata.element_type)
            for i, item in enumerate(value):  # a list of stages: each against StageSpec
                if isinstance(item, dict):
                    yield from repeats(item_schema, item, f"{path}[{i}]")
        elif _same(_plain(node), value):
            yield f"{path}: {value!r}"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_an_option_sets_only_what_differs_from_its_schema(group, option):
    base, own = option_layers(group, option)
    same = list(repeats(base, own, group))
    assert not same, (f"conf/{group}/{option}.yaml repeats its schema's default (keep the "
                      f"default in the dataclass, the YAML holds what differs): {same}")


def test_the_root_config_sets_only_what_differs_from_the_run_schema():
    data = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"), resolve=False)
    own = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
    assert not list(repeats(OmegaConf.structured(RunConfig), own, "train.yaml"))


def test_the_check_finds_a_repeated_default():
    """The check is not vacuous: it sees repeats at the top, nested, and in a list of stages."""
    base, _ = option_layers("freeze", "two_stage")
    own = {"name": "two_stage", "head_epochs": 5, "finetune_bn": "frozen", "fine_tune_at": 3,
           "stages": [{"name": "head", "epochs": 2, "bn": "frozen", "reset_optimizer": True}]}
    assert list(repeats(base, own, "freeze")) == [
        "freeze.name: 'two_stage'", "freeze.head_epochs: 5", "freeze.finetune_bn: 'frozen'",
        "freeze.stages[0].bn: 'frozen'"]
    trainer, _ = option_layers("trainer", "default")
    assert list(repeats(trainer, {"early_stopping": {"monitor": "val_loss", "patience": 3},
                                  "amp": "off", "channels_last": True}, "trainer")) == [
        "trainer.early_stopping.monitor: 'val_loss'", "trainer.channels_last: True"]
    optimizer, _ = option_layers("optimizer", "adam")
    assert list(repeats(optimizer, {"eps": 1.0e-8, "lr": 1}, "optimizer")) == [
        "optimizer.eps: 1e-08"]
