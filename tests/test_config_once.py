"""Defaults once: a conf/ YAML holds its defaults line and only the values that differ from its
schema (the dataclass holds the default), and make_config(group, option) gives that option as
group=option does (test_heads_config composes every option to compare). Composing nothing, so
it is in the fast tier."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from transferlab.config import (
    HeadConfig,
    RunConfig,
    SelectorSpec,
    SGDConfig,
    StepSchedulerConfig,
    make_config,
)
from transferlab.config.load import option_layers
from transferlab.config.schema import GROUPS, Sampler
from transferlab.errors import UserError

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


# --- make_config: the option as group=option gives it ---------------------------------------------


def test_the_two_defaults_that_disagreed_are_decided():
    # scheduler=step: its own schema holds its default, 3 (what the option always gave)
    assert make_config("scheduler", "step").step_epochs == 3 == StepSchedulerConfig().step_epochs
    # head=mlp: HeadConfig is shared by three heads and keeps 0.0; the mlp option sets 0.2
    assert make_config("head", "mlp").dropout == 0.2
    assert make_config("head", "linear").dropout == 0.0 == HeadConfig(name="mlp").dropout


def test_make_config_takes_fields_and_says_what_is_wrong_in_one_line():
    sgd = make_config("optimizer", "sgd", lr=0.1)
    assert isinstance(sgd, SGDConfig) and (sgd.lr, sgd.momentum) == (0.1, 0.9)
    two = make_config("freeze", "two_stage", head_epochs=2)
    assert [s.epochs for s in two.stages] == [2, 5]  # ${freeze.head_epochs}, resolved
    assert two.stages[1].train[1] == SelectorSpec("blocks[-4:]", lr_mult=0.1)
    assert make_config("trainer", "default", sampler="balanced").sampler is Sampler.balanced
    # a registered option without a file: its schema's defaults
    assert make_config("backbone", "torchvision", name="resnet18").weights == "DEFAULT"
    for args, fields, says in [
        (("optimizer", "adam"), {"momentum": 0.9}, "unknown key optimizer.momentum"),
        (("optimizer", "adm"), {}, "unknown optimizer option 'adm' (did you mean 'adam'"),
        (("trainer", "default"), {"sampler": "x"}, "trainer.sampler must be one of shuffle"),
        (("dataset", "csv"), {}, "dataset.root is not set"),
    ]:
        with pytest.raises(UserError) as exc:
            make_config(*args, **fields)
        assert str(exc.value).startswith(says), str(exc.value)
