"""Classifier heads, the typed config mapping and the real Hydra config tree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from transferlab.backbones import build_backbone, probe_features
from transferlab.config import (
    BackboneConfig,
    CosineSchedulerConfig,
    FreezeConfig,
    HeadConfig,
    RunConfig,
    SelectorSpec,
    TrainerConfig,
    load_config,
    make_config,
    typed_object,
)
from transferlab.config.load import option_layers
from transferlab.config.schema import GROUPS as SCHEMA_GROUPS
from transferlab.config.schema import plain
from transferlab.config.validate import stage
from transferlab.errors import UserError
from transferlab.heads import build_head
from transferlab.model import TransferModel

from .conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


pytestmark = pytest.mark.usefixtures("one_thread")




# --- heads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 3, 3), (24, 1, 1), (10,)])
@pytest.mark.parametrize("name", ["linear", "mlp", "flatten_dense"])
def test_head_maps_features_to_logits(name, shape):
    torch.manual_seed(0)
    head = build_head(HeadConfig(name=name, dropout=0.2), shape, num_classes=5)
    head.train()
    logits = head(torch.randn(4, *shape))
    assert logits.shape == (4, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    head.eval()
    assert head(torch.randn(2, *shape)).shape == (2, 5)


def test_mlp_head_has_batchnorm_and_dropout():
    head = build_head(HeadConfig(name="mlp", dropout=0.3), (16, 2, 2), num_classes=4)
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    drops = [m for m in head.modules() if isinstance(m, nn.Dropout)]
    assert len(bns) == 1 and bns[0].num_features == 16
    assert len(drops) == 1 and drops[0].p == pytest.approx(0.3)
    linear = build_head(HeadConfig(name="linear"), (16, 2, 2), num_classes=4)
    assert not any(isinstance(m, nn.BatchNorm1d | nn.Dropout) for m in linear.modules())


def test_linear_head_pools_over_space():
    head = build_head(HeadConfig(name="linear"), (8, 3, 3), num_classes=2)
    x = torch.randn(2, 8, 3, 3)
    pooled = x.mean(dim=(2, 3))
    torch.testing.assert_close(head(x), head(pooled))
    # any spatial size works for a pooled head
    assert head(torch.randn(2, 8, 5, 7)).shape == (2, 2)


def test_flatten_dense_sees_every_position():
    head = build_head(HeadConfig(name="flatten_dense"), (4, 2, 2), num_classes=3)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 4 * 2 * 2


@pytest.mark.parametrize("other", [(16, 4, 4), (16, 2, 3), (8, 3, 3)])
def test_flatten_dense_rejects_another_feature_shape(other):
    head = build_head(HeadConfig(name="flatten_dense"), (16, 3, 3), num_classes=5)
    with pytest.raises(UserError) as exc:
        head(torch.randn(2, *other))
    message = str(exc.value)
    assert "\n" not in message
    assert "flatten_dense" in message
    assert str(other) in message and str((16, 3, 3)) in message


def test_flatten_dense_on_a_real_backbone_needs_its_image_size():
    torch.manual_seed(0)
    backbone = build_backbone(
        BackboneConfig(name="test_efficientnet", source="timm", pretrained=False)
    )
    shape = probe_features(backbone, 64)
    assert len(shape) == 3 and shape[1] * shape[2] > 1
    model = TransferModel(backbone.module, build_head(HeadConfig(name="flatten_dense"), shape, 3))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
        with pytest.raises(UserError, match="flatten_dense"):
            model(torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize(("cfg", "match"), [
    (HeadConfig(name="attention"), "attention"),
    (HeadConfig(name="linear", dropout=1.0), "dropout"),
    (HeadConfig(name="mlp", dropout=-0.1), "dropout"),
])
def test_bad_head_config_is_a_user_error(cfg, match):
    with pytest.raises(UserError, match=match):
        build_head(cfg, (8, 2, 2), num_classes=3)


# --- typing plain data (a saved run's config) ---------------------------------------------------


def _typed(schema, data, where):
    return typed_object(schema, data, where)


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(UserError) as exc:
        _typed(TrainerConfig, {"epoch": 3}, "trainer")
    message = str(exc.value)
    assert "\n" not in message
    assert "trainer.epoch:" in message
    assert "'epochs'" in message


def test_unknown_nested_key_names_its_full_path():
    data = {"name": "x", "stages": [{"name": "s", "epoch": 1, "train": ["head"]}]}
    with pytest.raises(UserError) as exc:
        _typed(FreezeConfig, data, "freeze")
    assert "freeze.stages[0].epoch" in str(exc.value)
    assert "'epochs'" in str(exc.value)


def test_selector_entries_are_strings_or_mappings():
    data = {"name": "x", "stages": [{
        "name": "s", "epochs": 2,
        "train": ["head", {"select": "blocks[-1]", "lr_mult": 0.1},
                  {"select": "blocks[-2]", "lr": 1e-5}],
    }]}
    freeze = _typed(FreezeConfig, data, "freeze")
    stage(freeze.stages[0], "freeze.stages[0]")
    assert freeze.stages[0].train == [
        SelectorSpec(select="head"),
        SelectorSpec(select="blocks[-1]", lr_mult=0.1),
        SelectorSpec(select="blocks[-2]", lr=1e-5),
    ]
    assert freeze.total_epochs == 2


@pytest.mark.parametrize(("entry", "match"), [
    ({"select": "head", "lr_mul": 0.1}, r"train\[0\]\.lr_mul.*'lr_mult'"),
    ({"lr_mult": 0.1}, r"train\[0\]\.select is not set"),
    (3, "must be a selector"),
    ({"select": "head", "lr_mult": 0}, r"train\[0\]\.lr_mult must be > 0"),
])
def test_bad_selector_entry_is_a_user_error(entry, match):
    data = {"name": "x", "stages": [{"name": "s", "epochs": 1, "train": [entry]}]}
    with pytest.raises(UserError, match=match):
        stage(_typed(FreezeConfig, data, "freeze").stages[0], "freeze.stages[0]")


def test_types_are_checked_not_coerced():
    cfg = _typed(TrainerConfig, {"epochs": 3, "eval_batch_size": None}, "trainer")
    assert cfg.epochs == 3 and cfg.eval_batch_size is None
    with pytest.raises(UserError, match="trainer.epochs must be an int, got 'three'"):
        _typed(TrainerConfig, {"epochs": "three"}, "trainer")
    with pytest.raises(UserError, match="trainer.epochs must be an int, got 3.5"):
        _typed(TrainerConfig, {"epochs": 3.5}, "trainer")


# --- the Hydra config tree -----------------------------------------------------------------------


def test_unknown_key_from_the_command_line_is_a_user_error():
    with pytest.raises(UserError, match="'epochs'"):
        load_config(compose_train(["+trainer.epoch=3"]))


def test_freeze_scratch_turns_pretrained_off():
    assert load_config(compose_train()).backbone.pretrained is True
    run = load_config(compose_train(["freeze=scratch"]))
    assert run.backbone.pretrained is False
    assert run.freeze.name == "scratch"
    assert [s.select for s in run.freeze.stages[0].train] == ["backbone", "head"]
    run = load_config(compose_train(["backbone=resnet18", "freeze=scratch"]))
    assert (run.backbone.name, run.backbone.pretrained) == ("resnet18", False)


def test_linear_probe_with_epochs_gives_one_stage():
    run = load_config(compose_train(["freeze=linear_probe", "trainer.epochs=3"]))
    assert len(run.freeze.stages) == 1
    only = run.freeze.stages[0]
    assert only.epochs == 3 and run.freeze.total_epochs == 3
    assert only.train == [SelectorSpec(select="head")]
    assert only.bn == "frozen"


def test_stage_shorthand_and_a_stage_scheduler_compose_and_load_typed():
    """What keeps StageSpec.train and .scheduler untyped for OmegaConf (see StageSpec): a plain
    string selector, and a stage scheduler with its own scheduler's keys, from the command
    line; load_config types both."""
    run = load_config(compose_train([
        "freeze=linear_probe", "freeze.stages.0.train=[head,{select:'blocks[-1]',lr_mult:0.5}]",
        "+freeze.stages.0.scheduler={name:cosine,min_lr_mult:0.1}"]))
    (only,) = run.freeze.stages
    assert only.train == [SelectorSpec("head"), SelectorSpec("blocks[-1]", lr_mult=0.5)]
    assert isinstance(only.scheduler, CosineSchedulerConfig) and only.scheduler.min_lr_mult == 0.1
    saved = run.as_dict()["freeze"]["stages"][0]
    assert saved["train"][0] == {"select": "head", "lr": None, "lr_mult": 1.0}
    assert saved["scheduler"] == {"name": "cosine", "warmup_steps": 0, "min_lr_mult": 0.1}
    again = load_config(run.as_dict()).freeze.stages[0]  # a checkpoint's plain config
    assert again.train == only.train and again.scheduler == only.scheduler


def test_every_group_has_options():
    assert {"backbone", "head", "dataset", "augment", "freeze", "optimizer", "trainer"} <= set(
        GROUPS)


def _assert_matches(actual, expected, where: str) -> None:
    """The loaded dataclass holds the option file's literal values (interpolations skipped)."""
    if isinstance(expected, str) and ("${" in expected or expected == "???"):
        return
    if isinstance(expected, dict):
        assert dataclasses.is_dataclass(actual), where
        for key, value in expected.items():
            if key == "defaults":
                continue
            _assert_matches(getattr(actual, key), value, f"{where}.{key}")
    elif isinstance(actual, SelectorSpec) and isinstance(expected, str):
        assert actual.select == expected, where
    elif isinstance(expected, list):
        actual = list(actual)
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_matches(a, e, f"{where}[{i}]")
    elif isinstance(actual, float) and isinstance(expected, str):
        assert actual == float(expected), where  # PyYAML reads 1.0e4 as a string
    else:
        assert actual == expected, where


def _required_keys(data: dict, prefix: str):
    """Dotted keys of the values an option's file leaves to the command line."""
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _required_keys(value, path)
        elif value == "???" or (isinstance(value, str)
                                and value.startswith("${transferlab_required:")):
            yield path


def _schema_required_keys(group: str, option: str) -> list[str]:
    """Dotted keys that an option leaves ??? in its schema (its file does not repeat them)."""
    if group not in SCHEMA_GROUPS:
        return []  # experiment, hparams_search: their files say it
    def missing(node, where):  # (OmegaConf.missing_keys resolves the interpolations)
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing():
                yield from missing(child, f"{where}.{key}")
            elif child._is_missing():
                yield f"{where}.{key}"

    return list(missing(OmegaConf.merge(*option_layers(group, option)), group))


# Options that only go with another one (the config's validation says so).
COMPANIONS = {"task=autoencoder": ["backbone=conv_encoder"]}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_loads(group, option, tmp_path):
    """Every option file keeps in step with its schema: it composes, loads and gives its
    values; and ``make_config(group, option)`` is the section ``group=option`` gives the run.
    Composing only (about 0.2 s an option), so it is in the fast tier."""
    text = (CONF / group / f"{option}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    is_global = "@package _global_" in text
    overrides = [f"{group}={option}", *COMPANIONS.get(f"{group}={option}", [])]
    # mandatory values (??? or ${transferlab_required:...}) are the user's to give: give them
    prefix = "" if is_global else group
    a_file = tmp_path / "given.pt"
    a_file.write_bytes(b"")
    required = {key: str(a_file if key.endswith("path") else tmp_path)
                for key in [*_required_keys(data, prefix), *_schema_required_keys(group, option)]}
    overrides += [f"{key}={value}" for key, value in required.items()]
    run = load_config(compose_train(overrides))
    assert isinstance(run, RunConfig)
    if is_global:
        for top, value in data.items():
            if top not in ("defaults", "hydra"):  # hydra: a sweeper's own settings
                _assert_matches(getattr(run, top), value, top)
    else:
        _assert_matches(getattr(run, group), data, group)
    if group in SCHEMA_GROUPS:  # not experiment, hparams_search: they set several groups
        given = {key.partition(".")[2]: value for key, value in required.items()
                 if key.startswith(f"{group}.")}
        # freeze=scratch also sets backbone.pretrained: a global file; its freeze is compared
        assert plain(make_config(group, option, **given)) == run.as_dict()[group]
