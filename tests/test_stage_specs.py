"""The stage table's counts, and bad stage specs as one-line user errors."""

from __future__ import annotations

import re

import pytest

from transferlab.config import compose_config, load_config
from transferlab.errors import UserError
from transferlab.staging.policy import apply_stage, plan_stages
from transferlab.staging.summary import stage_rows, stage_table

from .conftest import TINY
from .stage_helpers import (
    FREEZE_PRESETS,
    block_params,
    build_model,
    one_line_error,
    preset_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 6. the stage table ------------------------------------------------------------------------


def table_number(table: str, label: str) -> int:
    match = re.search(rf"(?<![\w-]){label}: ([\d,]+)", table)
    assert match, f"no '{label}:' in the table"
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize("preset", FREEZE_PRESETS)
def test_stage_table_counts_trainable_parameters(preset, compose_cfg):
    run = load_config(compose_cfg(preset_overrides(preset, "head=mlp")))
    model, backbone = build_model(run)
    total = sum(p.numel() for p in model.parameters())
    for plan in plan_stages(model, backbone, run.freeze, run.optimizer.lr):
        apply_stage(model, plan)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert 0 < trainable <= total
        table = stage_table(model, backbone, plan)
        assert table_number(table, "trainable") == trainable, plan.name
        assert table_number(table, "non-trainable") == total - trainable
        assert table_number(table, "total params") == total
        assert f"'{plan.name}'" in table.splitlines()[0]
        rows = stage_rows(model, backbone, plan)
        assert sum(r.trainable for r in rows) == trainable


# --- 7. bad specs are one-line user errors -------------------------------------------------------


def test_selector_matching_nothing_names_the_nearest_names(compose_cfg):
    run = load_config(compose_cfg(preset_overrides("top_k")))
    model, backbone = build_model(run)
    target = f"backbone.{backbone.blocks[-3].paths[0]}"
    assert target in {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    typo = target + target[-1]
    run = load_config(compose_cfg(preset_overrides("top_k",
                                                   f"freeze.stages.0.train=[head,{typo}]")))
    with pytest.raises(UserError) as exc:
        plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    message = one_line_error(exc)
    assert repr(typo) in message and repr(run.freeze.stages[0].name) in message
    assert re.search(rf"{re.escape(target)}(?![\w.])", message), message
    for block in backbone.blocks:
        assert block.name in message


def test_block_slice_past_the_end_is_a_user_error(compose_cfg):
    run = load_config(compose_cfg([*TINY, "freeze=freeze_first_n", "freeze.n=100"]))
    model, backbone = build_model(run)
    with pytest.raises(UserError) as exc:
        plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert "'blocks[100:]'" in one_line_error(exc)


def test_parameter_claimed_with_two_lrs_is_a_user_error(compose_cfg):
    cfg = compose_cfg([*TINY, "freeze=linear_probe",
                       "freeze.stages.0.train=[backbone,{select:'blocks[-1]',lr_mult:0.5}]"])
    run = load_config(cfg)
    model, backbone = build_model(run)
    with pytest.raises(UserError) as exc:
        plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    message = one_line_error(exc)
    assert "'backbone'" in message and "'blocks[-1]'" in message
    shared = block_params(backbone, backbone.blocks[-1:])
    first = next(n for n, _ in model.named_parameters() if n in shared)
    assert f"parameter {first} " in message


def test_same_parameter_with_the_same_lr_is_fine(compose_cfg):
    cfg = compose_cfg([*TINY, "freeze=linear_probe",
                       "freeze.stages.0.train=[backbone,{select:'blocks[-1]',lr_mult:1.0}]"])
    run = load_config(cfg)
    model, backbone = build_model(run)
    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert plan.trainable() == block_params(backbone, backbone.blocks)


@pytest.mark.parametrize(("override", "needles"), [
    ("+freeze.stages.0.epoch=3", ["freeze.stages[0].epoch", "'epochs'"]),
    ("+freeze.stages.0.train.0.lr_mul=2", ["freeze.stages[0].train[0].lr_mul", "'lr_mult'"]),
    ("+freeze.stages.0.scheduler.warmup=3", ["freeze.stages[0].scheduler.warmup",
                                             "'warmup_steps'"]),
])
def test_unknown_stage_key_names_the_nearest_key(override, needles, compose_cfg):
    overrides = [*TINY, "freeze=linear_probe", override]
    if ".train.0." in override:  # a mapping entry instead of the plain string
        overrides.insert(-1, "freeze.stages.0.train=[{select:head}]")
    with pytest.raises(UserError) as exc:
        load_config(compose_cfg(overrides))
    message = one_line_error(exc)
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(("decay", "ok"), [(0.0, False), (-0.5, False), (1.5, False),
                                           (1.0, True), (0.3, True)])
def test_layer_decay_must_be_in_zero_one(decay, ok, compose_cfg):
    cfg = compose_cfg([*TINY, "freeze=discriminative", f"freeze.decay={decay}"])
    if ok:
        assert load_config(cfg).freeze.stages[0].layer_decay == decay
        return
    with pytest.raises(UserError) as exc:
        load_config(cfg)
    message = one_line_error(exc)
    assert "freeze.decay" in message and str(decay) in message  # the knob the user set


@pytest.mark.parametrize(("preset", "override", "where"), [
    ("linear_probe", "freeze.stages.0.bn=training", "freeze.stages[0].bn"),
    ("two_stage", "freeze.stages.1.bn=Frozen", "freeze.stages[1].bn"),
    ("gradual", "freeze.gradual.bn=evaluate", "freeze.gradual.bn"),
])
def test_bn_must_be_a_known_mode(preset, override, where):
    with pytest.raises(UserError) as exc:  # at composition: bn is a BnMode
        load_config(compose_config([*TINY, f"freeze={preset}", override]))
    message = one_line_error(exc)
    assert where in message
    assert all(mode in message for mode in ("frozen", "train", "eval"))


def test_stages_and_gradual_together_are_a_user_error(compose_cfg):
    cfg = compose_cfg([*TINY, "freeze=gradual", "+freeze.stages=[{name:x,epochs:1,train:[head]}]"])
    with pytest.raises(UserError) as exc:
        load_config(cfg)
    message = one_line_error(exc)
    assert "stages" in message and "gradual" in message and "'gradual'" in message
