"""Learning rates per stage: every param group at its configured LR (two_stage, discriminative,
gradual), and the per-stage schedules (warm-up, cosine, step, onecycle, a stage's own)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from transferlab.backbones import build_backbone
from transferlab.config import SchedulerConfig, load_config, make_config
from transferlab.data import build_splits, make_loaders
from transferlab.errors import UserError
from transferlab.run import train
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages, resolve_selector
from transferlab.staging.schedule import StageSchedule, lr_multiplier

from .conftest import TINY
from .stage_helpers import (
    CPU,
    FREEZE_PRESETS,
    block_index_of,
    block_params,
    build_model,
    head_params,
    one_line_error,
    preset_overrides,
    read_events,
    torch_lrs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 2. learning rates -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", FREEZE_PRESETS)
def test_every_param_group_has_its_configured_lr(preset, compose_cfg):
    base_lr = 0.02
    run = load_config(compose_cfg(preset_overrides(preset, f"optimizer.lr={base_lr}")))
    model, backbone = build_model(run)
    names = [n for n, _ in model.named_parameters()]
    index = block_index_of(backbone)
    n_blocks = len(backbone.blocks)
    for plan in plan_stages(model, backbone, run.freeze, run.optimizer.lr):
        expected: dict[str, float] = {}
        for sel in plan.spec.train:
            lr = sel.lr if sel.lr is not None else base_lr * sel.lr_mult
            for n in resolve_selector(sel.select, names, backbone):
                expected.setdefault(n, lr)
        if plan.spec.layer_decay is not None:
            for n in expected:
                if n in index:
                    expected[n] *= plan.spec.layer_decay ** (n_blocks - 1 - index[n])
        apply_stage(model, plan)
        optimizer = stage_optimizer(model, plan, run.optimizer, None)
        actual = torch_lrs(model, optimizer)
        assert actual.keys() == expected.keys(), plan.name
        for n, lr in expected.items():
            assert actual[n] == pytest.approx(lr, rel=1e-12), (plan.name, n)


@pytest.mark.parametrize("fine_tune_at", [3, -2])
def test_two_stage_learning_rates_and_selection(fine_tune_at, compose_cfg):
    base_lr, mult = 0.01, 0.25
    run = load_config(compose_cfg(preset_overrides(
        "two_stage", f"optimizer.lr={base_lr}", f"freeze.fine_tune_at={fine_tune_at}",
        f"freeze.finetune_lr_mult={mult}")))
    model, backbone = build_model(run)
    head, fine = head_params(model), block_params(backbone, backbone.blocks[fine_tune_at:])
    assert fine and fine != block_params(backbone, backbone.blocks)
    first, second = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert (first.name, second.name) == ("head", "finetune")
    for plan, trained, lr in ((first, head, base_lr), (second, head | fine, base_lr * mult)):
        apply_stage(model, plan)
        lrs = torch_lrs(model, stage_optimizer(model, plan, run.optimizer, None))
        assert set(lrs) == trained
        assert all(v == pytest.approx(lr) for v in lrs.values()), (plan.name, lrs)


def test_discriminative_layer_decay(compose_cfg):
    base_lr, decay = 0.01, 0.5
    run = load_config(compose_cfg(preset_overrides(
        "discriminative", f"optimizer.lr={base_lr}", f"freeze.decay={decay}")))
    model, backbone = build_model(run)
    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    apply_stage(model, plan)
    lrs = torch_lrs(model, stage_optimizer(model, plan, run.optimizer, None))
    assert set(lrs) == {n for n, _ in model.named_parameters()}
    n = len(backbone.blocks)
    for i, block in enumerate(backbone.blocks):
        for name in block_params(backbone, [block]):
            assert lrs[name] == pytest.approx(base_lr * decay ** (n - 1 - i)), name
    for name in head_params(model):
        assert lrs[name] == pytest.approx(base_lr), name
    assert len({round(v, 15) for v in lrs.values()}) == n  # the head shares the top block's


@pytest.mark.parametrize("blocks", [3, None, 100])
def test_gradual_unfreezes_one_block_per_stage(blocks, compose_cfg):
    base_lr, block_mult, decay = 0.01, 0.2, 0.5
    run = load_config(compose_cfg([
        *TINY, "freeze=gradual", f"optimizer.lr={base_lr}",
        f"freeze.gradual.blocks={'null' if blocks is None else blocks}",
        f"freeze.gradual.block_lr_mult={block_mult}", f"freeze.gradual.decay={decay}",
        "freeze.gradual.every=2", "freeze.gradual.head_epochs=3"]))
    model, backbone = build_model(run)
    n = len(backbone.blocks)
    count = n if blocks is None else min(blocks, n)
    plans = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert len(plans) == 1 + count
    assert [p.name for p in plans] == ["head"] + [f"+{backbone.blocks[n - j].name}"
                                                  for j in range(1, count + 1)]
    assert [p.spec.epochs for p in plans] == [3] + [2] * count
    assert [p.first_epoch for p in plans] == [1] + [4 + 2 * i for i in range(count)]
    head = head_params(model)
    for j, plan in enumerate(plans):
        apply_stage(model, plan)
        lrs = torch_lrs(model, stage_optimizer(model, plan, run.optimizer, None))
        expected = dict.fromkeys(head, base_lr)
        for k in range(1, j + 1):  # block n-k joined at stage k; its LR never changes
            for name in block_params(backbone, [backbone.blocks[n - k]]):
                expected[name] = base_lr * block_mult * decay ** (k - 1)
        assert lrs.keys() == expected.keys(), plan.name
        for name, lr in expected.items():
            assert lrs[name] == pytest.approx(lr), (plan.name, name)


# --- 5. schedulers -------------------------------------------------------------------------------


def mults(spec: SchedulerConfig, total: int, per_epoch: int) -> list[float]:
    return [lr_multiplier(spec, s, total, per_epoch) for s in range(total)]


def test_constant_schedule_is_one():
    assert mults(make_config("scheduler", "constant"), 17, 5) == [1.0] * 17


@pytest.mark.parametrize("name", ["constant", "cosine"])
def test_warmup_rises_linearly_to_one(name):
    warmup, total = 5, 30
    m = mults(make_config("scheduler", name, warmup_steps=warmup), total, 10)
    assert m[:warmup] == pytest.approx([(i + 1) / warmup for i in range(warmup)])
    steps = np.diff(m[:warmup])
    assert steps == pytest.approx([1 / warmup] * (warmup - 1))
    assert m[warmup - 1] == pytest.approx(1.0) and m[warmup] == pytest.approx(1.0)
    assert max(m) == pytest.approx(1.0)


def test_cosine_decays_monotonically_to_min_lr_mult():
    spec = make_config("scheduler", "cosine", min_lr_mult=0.1)
    m = mults(spec, 23, 7)
    assert m[0] == pytest.approx(1.0) and m[-1] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(m, m[1:], strict=False))
    assert m[11] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the cosine's midpoint
    assert min(m) >= 0.1 - 1e-12


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    spec = make_config("scheduler", "step", step_epochs=2, gamma=0.5)
    per_epoch, epochs = 3, 7
    m = mults(spec, per_epoch * epochs, per_epoch)
    assert m == pytest.approx([0.5 ** (s // (2 * per_epoch)) for s in range(per_epoch * epochs)])
    assert len(set(m)) == math.ceil(epochs / 2)


def test_onecycle_rises_to_one_then_anneals():
    spec = make_config("scheduler", "onecycle", pct_start=0.3, div_factor=25.0,
                       final_div_factor=1e4)
    total = 100
    m = mults(spec, total, 10)
    peak = int(np.argmax(m))
    assert m[0] == pytest.approx(1 / 25.0)
    assert m[peak] == pytest.approx(1.0)
    assert abs(peak - 0.3 * total) <= 1
    assert all(b >= a for a, b in zip(m[:peak], m[1:peak + 1], strict=True))
    assert all(b <= a for a, b in zip(m[peak:], m[peak + 1:], strict=False))
    assert m[-1] == pytest.approx(1 / (25.0 * 1e4), rel=1e-3)


@pytest.mark.parametrize("name", ["cosine", "onecycle", "step"])
def test_stage_schedule_keeps_per_group_lr_ratios(name, compose_cfg):
    run = load_config(compose_cfg(preset_overrides("discriminative", "freeze.decay=0.5")))
    model, backbone = build_model(run)
    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    apply_stage(model, plan)
    optimizer = stage_optimizer(model, plan, run.optimizer, None)
    base = [g["lr"] for g in optimizer.param_groups]
    assert len(set(base)) == len(backbone.blocks)  # really several LRs
    fields = {"step": {"step_epochs": 1, "gamma": 0.3}}.get(name, {})
    spec = make_config("scheduler", name, warmup_steps=2, **fields)
    per_epoch, epochs = 4, 3
    schedule = StageSchedule(spec, epochs, per_epoch)
    for step in range(per_epoch * epochs):
        schedule.apply(optimizer)
        mult = lr_multiplier(spec, step, per_epoch * epochs, per_epoch)
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            assert group["lr"] == pytest.approx(lr * mult)
            assert group["initial_lr"] == lr
    assert schedule.step == per_epoch * epochs


@pytest.mark.slow
def test_stage_scheduler_overrides_the_run_scheduler(compose_cfg, tmp_path):
    lr, floor = 0.01, 0.5
    cfg = compose_cfg([*TINY, "scheduler=cosine", f"scheduler.min_lr_mult={floor}",
                       f"optimizer.lr={lr}", "trainer.batch_size=256"])
    cfg.freeze.merge_with({"stages": [
        {"name": "a", "epochs": 1, "train": ["head"]},  # the run's cosine
        {"name": "b", "epochs": 1, "train": ["head"],
         "scheduler": {"name": "constant", "warmup_steps": 2}},
    ]})
    run = load_config(cfg)
    assert run.scheduler.name == "cosine" and run.freeze.stages[1].scheduler.name == "constant"
    backbone = build_backbone(run.backbone)
    splits = build_splits(run.dataset, run.augment, backbone.input, run.dataset.image_size)
    steps = len(make_loaders(splits, run.trainer, run.seed, CPU)[0])
    assert steps >= 3

    train(cfg, tmp_path)

    cosine = [lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / (steps - 1))))
              for s in range(steps)]
    constant = [lr / 2] + [lr] * (steps - 1)
    logged = [e.value for e in read_events(tmp_path).Scalars("lr/head")]
    assert logged == pytest.approx(cosine + constant, rel=1e-6)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["a", "b"]
    assert history[0]["lr"]["head"] == pytest.approx(lr * floor)
    assert history[1]["lr"]["head"] == pytest.approx(lr)


@pytest.mark.parametrize(("override", "where"), [
    ("scheduler.name=cosin", "scheduler.name"),
    ("+freeze.stages.0.scheduler.name=onecycel", "freeze.stages[0].scheduler.name"),
])
def test_unknown_scheduler_is_a_one_line_user_error(override, where, compose_cfg):
    with pytest.raises(UserError) as exc:
        load_config(compose_cfg([*TINY, override]))
    message = one_line_error(exc)
    bad = override.rpartition("=")[2]
    assert where in message and repr(bad) in message
    close = "'cosine'" if bad == "cosin" else "'onecycle'"
    assert close in message
