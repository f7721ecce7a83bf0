"""Freeze policies as stages, end to end: every freeze preset trains exactly its selection with
frozen BatchNorm bit-identical, a two-stage run switches at its epoch, the optimizer state
across a switch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from transferlab.backbones import build_backbone
from transferlab.config import load_config
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.infra.runtime import seed_everything
from transferlab.run import train
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages, set_train_mode

from .conftest import TINY
from .stage_helpers import (
    FREEZE_PRESETS,
    KNOBS,
    build_model,
    head_params,
    is_bn,
    preset_overrides,
    random_loader,
    read_events,
    run_stage,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 1. every preset: exactly the selected parameters train, frozen BN stays bit-identical -----


def test_knobs_refer_to_existing_presets():
    assert FREEZE_PRESETS and set(KNOBS) <= set(FREEZE_PRESETS)


@pytest.mark.parametrize("preset", FREEZE_PRESETS)
@pytest.mark.slow
def test_every_preset_trains_exactly_its_selection(preset, compose_cfg):
    run = load_config(compose_cfg(preset_overrides(preset, "head=mlp")))
    assert run.freeze.name == preset
    model, backbone = build_model(run)
    plans = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert plans
    loader = random_loader(run.dataset.image_size)
    optimizer = None
    ever_trained: set[str] = set()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for plan in plans:
        assert plan.spec.epochs >= 1, "the knobs should give every stage an epoch"
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}

        optimizer = run_stage(model, plan, run, optimizer, loader)

        selected = plan.trainable()
        assert selected
        assert {n for n, p in model.named_parameters() if p.requires_grad} == selected
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, params[n])}
        assert changed == selected, (
            f"stage {plan.name}: frozen but changed {sorted(changed - selected)[:3]}, "
            f"selected but unchanged {sorted(selected - changed)[:3]}")
        ever_trained |= selected
        bn_buffers = set()
        for mod_name, module in model.named_modules():
            if not is_bn(module):
                continue
            trains = plan.spec.bn == "train" or plan.spec.bn == "frozen" and any(
                p.requires_grad for p in module.parameters(recurse=False))
            for buf_name, buf in module.named_buffers(recurse=False):
                key = f"{mod_name}.{buf_name}"
                bn_buffers.add(key)
                same = torch.equal(buf, buffers[key])
                if trains:
                    assert not same, f"stage {plan.name}: BatchNorm buffer {key} did not update"
                else:
                    assert same, f"stage {plan.name} (bn frozen): buffer {key} of a frozen block"
        assert bn_buffers
        for key in set(buffers) - bn_buffers:  # any other buffer never changes
            assert torch.equal(model.get_buffer(key), buffers[key]), key
    final = model.state_dict()
    for name, _ in model.named_parameters():
        assert torch.equal(final[name], initial[name]) == (name not in ever_trained), name


# --- 3. a whole two-stage run: the switch happens at the configured epoch ---------------------


@pytest.mark.slow
def test_two_stage_run_switches_at_the_configured_epoch(compose_cfg, tmp_path):
    lr = 0.01
    cfg = compose_cfg([*TINY, "freeze=two_stage", "freeze.head_epochs=1",
                       "freeze.finetune_epochs=2", f"optimizer.lr={lr}",
                       "trainer.batch_size=128"])
    run = load_config(cfg)
    train(cfg, tmp_path)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["stage"] for h in history] == ["head", "finetune", "finetune"]
    mult = run.freeze.finetune_lr_mult
    assert history[0]["lr"] == {"head": pytest.approx(lr)}
    finetune_groups = {s.select for s in run.freeze.stages[1].train}
    for record in history[1:]:
        assert set(record["lr"]) == finetune_groups
        assert all(v == pytest.approx(lr * mult) for v in record["lr"].values())

    events = read_events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("stage")] == [(1, 0), (2, 1), (3, 1)]
    head_lrs = [e.value for e in events.Scalars("lr/head")]
    steps = len(head_lrs) // 3
    assert steps >= 1 and len(head_lrs) == 3 * steps
    assert head_lrs[:steps] == pytest.approx([lr] * steps)
    assert head_lrs[steps:] == pytest.approx([lr * mult] * 2 * steps)
    texts = set(events.Tags()["tensors"])
    assert {"summary/head/text_summary", "summary/finetune/text_summary"} <= texts
    png = (tmp_path / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # blocks below fine_tune_at (and their BatchNorm statistics) are exactly as initialised
    seed_everything(run.seed, False)
    fresh = build_backbone(run.backbone)
    initial = fresh.module.state_dict()
    trained = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    at = run.freeze.fine_tune_at
    frozen = {k for b in fresh.blocks[:at] for p in b.paths for k in initial
              if k == p or k.startswith(p + ".")}
    assert any(k.endswith("running_mean") for k in frozen)
    for key, tensor in initial.items():
        same = torch.equal(trained[f"backbone.{key}"], tensor)
        if key in frozen:
            assert same, f"{key} of a frozen block changed"
        elif key.endswith(("weight", "bias", "running_mean")):
            assert not same, f"{key} of an unfrozen block did not train"


# --- 4. optimizer state across a stage switch ----------------------------------------------------


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_state_across_the_switch(reset, compose_cfg):
    overrides = preset_overrides("two_stage")
    if reset:
        overrides.append("freeze.stages.1.reset_optimizer=true")
    run = load_config(compose_cfg(overrides))
    assert run.optimizer.name == "adam"
    assert run.freeze.stages[1].reset_optimizer is reset
    model, backbone = build_model(run)
    first, second = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    loader = random_loader(run.dataset.image_size)
    params = dict(model.named_parameters())

    opt1 = run_stage(model, first, run, None, loader)
    kept = first.trainable() & second.trainable()
    new = second.trainable() - first.trainable()
    assert kept == head_params(model) and new
    saved = {n: {k: v.clone() for k, v in opt1.state[params[n]].items()} for n in kept}
    assert all(int(s["step"]) == len(loader) for s in saved.values())

    apply_stage(model, second)
    opt2 = stage_optimizer(model, second, run.optimizer, opt1)
    for n in new:
        assert not opt2.state.get(params[n]), f"newly unfrozen {n} should start without state"
    for n in kept:
        state = opt2.state.get(params[n], {})
        if reset:
            assert not state, f"{n}: reset_optimizer should drop the state"
        else:
            assert torch.equal(state["exp_avg"], saved[n]["exp_avg"]), n
            assert torch.equal(state["exp_avg_sq"], saved[n]["exp_avg_sq"]), n
    if reset:
        assert len(opt2.state) == 0

    set_train_mode(model, second)
    x, y = next(iter(loader))
    opt2.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt2.step()
    for n in kept:
        expected_step = 1 if reset else len(loader) + 1
        assert int(opt2.state[params[n]]["step"]) == expected_step, n
    for n in new:
        assert int(opt2.state[params[n]]["step"]) == 1, n
