"""Freeze policies as stages, end to end: every freeze preset, per-group learning rates, stage
switches in a run, optimizer state across a switch, per-stage schedulers, the stage table,
config errors, the experiment presets and the standard augmentation."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferlab.backbones import build_backbone, probe_features
from transferlab.config import SchedulerConfig, compose_config, load_config, make_config
from transferlab.data import build_splits, make_loaders
from transferlab.data.transforms import eval_transform, train_transform
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.engine.stepping import StepCalls
from transferlab.errors import UserError
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.infra.runtime import Precision, seed_everything
from transferlab.run import train
from transferlab.run.build import build_classifier
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages, resolve_selector, set_train_mode
from transferlab.staging.schedule import StageSchedule, lr_multiplier
from transferlab.staging.summary import stage_rows, stage_table

from .conftest import CONF_DIR, TINY, params_under

FAST = ["trainer.num_workers=0", "trainer.progress=false"]
NUM_CLASSES = 10  # digits, the default dataset
CPU = torch.device("cpu")

FREEZE_PRESETS = sorted(p.stem for p in (CONF_DIR / "freeze").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# Knob values that fit the 7-block test model and keep every stage to one epoch. A preset that
# is not listed runs with the TINY overrides (trainer.epochs=1) alone.
KNOBS = {
    "freeze_first_n": ["freeze.n=3"],
    "two_stage": ["freeze.head_epochs=1", "freeze.finetune_epochs=1"],
    "lp_ft": ["freeze.probe_epochs=1", "freeze.finetune_epochs=1"],
    "gradual": ["freeze.gradual.head_epochs=1", "freeze.gradual.every=1",
                "freeze.gradual.blocks=3"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers -------------------------------------------------------------------------------------


def preset_overrides(preset: str, *extra: str) -> list[str]:
    return [*TINY, f"freeze={preset}", *KNOBS.get(preset, []), *extra]


def build_model(run):
    """(model, backbone) the way runner.train builds them (same seed, same order of draws)."""
    seed_everything(run.seed, False)
    backbone = build_backbone(run.backbone)
    size = run.dataset.image_size or backbone.input.size
    shape = probe_features(backbone, size)
    model = build_classifier(run, backbone, shape, NUM_CLASSES)  # freeze=lora: + its adapters
    return model, backbone


def block_params(backbone, blocks) -> set[str]:
    """The parameters of ``blocks``, found from the module tree (not from the policy code)."""
    out: set[str] = set()
    for block in blocks:
        for path in block.paths:
            out |= params_under(backbone.module, path)
    return out


def block_index_of(backbone) -> dict[str, int]:
    return {n: i for i, b in enumerate(backbone.blocks) for n in block_params(backbone, [b])}


def head_params(model) -> set[str]:
    return {f"head.{n}" for n, _ in model.head.named_parameters()}


def random_loader(size: int = 32, n: int = 16, batch_size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 2 + 0.5
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def run_stage(model, plan, run, previous, loader):
    """One stage as runner.train runs it: requires_grad, optimizer, schedule, BN modes, epochs."""
    apply_stage(model, plan)
    optimizer = stage_optimizer(model, plan, run.optimizer, previous)
    schedule = StageSchedule(plan.spec.scheduler or run.scheduler, plan.spec.epochs, len(loader))
    precision = Precision(CPU, "off")
    for _ in range(plan.spec.epochs):
        set_train_mode(model, plan)
        train_epoch(model, loader, CrossEntropy(), optimizer, EpochContext(CPU, precision),
                    hooks=StepCalls(before=schedule.apply))
    return optimizer


def torch_lrs(model, optimizer) -> dict[str, float]:
    """Parameter name -> the LR of the torch param group that holds it (each param once)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert name not in out, f"{name} is in two param groups"
            assert group["initial_lr"] == group["lr"], name  # no schedule step taken yet
            out[name] = group["lr"]
    return out


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def read_events(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


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


# --- 8. experiment presets -----------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.slow
def test_every_experiment_composes_and_loads(name, compose_cfg, tmp_path):
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    # values a preset requires from the command line (${transferlab_required:KEY,...})
    required = re.findall(r"\$\{transferlab_required:([\w.]+)", text)
    given = tmp_path / "given.pt"
    given.write_bytes(b"")
    run = load_config(compose_cfg([f"experiment={name}", *(f"{k}={given}" for k in required)]))
    assert run.name.startswith(name)  # a preset names its runs (plus, maybe, the dataset)
    assert run.freeze.stages or run.freeze.gradual


def _vgg19(freeze: str, **extra):
    return dict(backbone="vgg19", image_size=32, head="flatten_dense", optimizer="adam",
                epochs=5, freeze=freeze, **extra)


DOCUMENTED = {
    "mobilenet_v2_two_stage": dict(
        backbone="mobilenet_v2", image_size=160, head="linear", optimizer="rmsprop", lr=1e-4,
        freeze="two_stage", knobs=dict(head_epochs=10, finetune_epochs=10, fine_tune_at=12,
                                       finetune_lr_mult=0.1), stage_epochs=[10, 10]),
    "vgg19_last_layer": _vgg19("linear_probe", stage_epochs=[5], pretrained=True),
    "vgg19_freeze_first_8": _vgg19("freeze_first_n", knobs=dict(n=5), stage_epochs=[5],
                                   pretrained=True),
    "vgg19_scratch": _vgg19("scratch", stage_epochs=[5], pretrained=False),
    "vgg16_transfer": dict(backbone="vgg16", head="mlp", dropout=0.2, optimizer="adam",
                           freeze="linear_probe", augment="standard", image_size=224),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
@pytest.mark.slow
def test_experiment_documented_values(name, compose_cfg):
    want = DOCUMENTED[name]
    run = load_config(compose_cfg([f"experiment={name}"]))
    assert run.backbone.name == want["backbone"]
    assert run.dataset.image_size == want["image_size"]
    assert run.head.name == want["head"]
    assert run.optimizer.name == want["optimizer"]
    assert run.freeze.name == want["freeze"]
    if "lr" in want:
        assert run.optimizer.lr == pytest.approx(want["lr"])
    if "epochs" in want:
        assert run.trainer.epochs == want["epochs"]
    for key, value in want.get("knobs", {}).items():
        assert getattr(run.freeze, key) == pytest.approx(value), key
    if "stage_epochs" in want:
        assert [s.epochs for s in run.freeze.stages] == want["stage_epochs"]
    if "pretrained" in want:
        assert run.backbone.pretrained is want["pretrained"]
    if "dropout" in want:
        assert run.head.dropout == pytest.approx(want["dropout"])
    if "augment" in want:
        assert run.augment.name == want["augment"]
    if want["freeze"] == "scratch":
        assert [s.select for s in run.freeze.stages[0].train] == ["backbone", "head"]
        assert run.freeze.stages[0].bn == "train"


def keras_vgg_layers(features: nn.Sequential) -> list[str]:
    """Keras' VGG layer names for a torchvision VGG ``features`` (ReLU is part of Keras' conv)."""
    names, stage, conv = ["input_1"], 1, 0
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            conv += 1
            names.append(f"block{stage}_conv{conv}")
        elif isinstance(layer, nn.MaxPool2d):
            names.append(f"block{stage}_pool")
            stage, conv = stage + 1, 0
    return names


@pytest.mark.slow
def test_vgg19_freeze_first_8_freezes_keras_layers_before_8(compose_cfg):
    run = load_config(compose_cfg(["experiment=vgg19_freeze_first_8",
                                   "backbone.pretrained=false", *FAST]))
    model, backbone = build_model(run)
    assert backbone.feature_shape == (512, 1, 1)  # 32 px through five pools
    keras = keras_vgg_layers(backbone.module.features)
    assert len(keras) == 1 + 16 + 5  # input, 16 convs, 5 pools: Keras' VGG19 without its top
    with_weights = [name for name in keras[:8] if "_conv" in name]
    assert with_weights == ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
                            "block3_conv1"]
    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    apply_stage(model, plan)
    trainable = plan.trainable()
    frozen = [b.name for b in backbone.blocks if not block_params(backbone, [b]) & trainable]
    assert frozen == with_weights
    assert frozen == [b.name for b in backbone.blocks[:run.freeze.n]]
    for block in backbone.blocks:
        params = block_params(backbone, [block])
        assert params and (params <= trainable) == (block.name not in frozen), block.name
    assert head_params(model) <= trainable
    frozen_params = block_params(backbone, backbone.blocks[:5])
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen_params


def test_mobilenet_v2_fine_tune_at_12_unfreezes_features_12_to_18(compose_cfg):
    run = load_config(compose_cfg(["experiment=mobilenet_v2_two_stage",
                                   "backbone.pretrained=false", *FAST]))
    model, backbone = build_model(run)
    assert len(backbone.blocks) == 19
    head, tune = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert head.trainable() == head_params(model)
    unfrozen = [b.name for b in backbone.blocks if block_params(backbone, [b]) & tune.trainable()]
    assert unfrozen == [f"features.{i}" for i in range(12, 19)]
    assert unfrozen == [b.name for b in backbone.blocks[12:]]
    assert tune.trainable() == head_params(model) | block_params(backbone, backbone.blocks[12:])
    apply_stage(model, tune)
    lrs = torch_lrs(model, stage_optimizer(model, tune, run.optimizer, None))
    assert all(v == pytest.approx(1e-5) for v in lrs.values())
    assert (head.first_epoch, tune.first_epoch, tune.last_epoch) == (1, 11, 20)


# --- 9. the standard (Keras ImageDataGenerator) augmentation -------------------------------------


def test_standard_augment_composes_and_randomises(compose_cfg):
    run = load_config(compose_cfg([*TINY, "augment=standard"]))
    spec = yaml.safe_load((CONF_DIR / "augment" / "standard.yaml").read_text())
    for key, value in spec.items():
        if key == "defaults":
            continue
        assert getattr(run.augment, key) == pytest.approx(value) if key != "name" \
            else run.augment.name == value
    backbone = build_backbone(run.backbone)
    size = run.dataset.image_size
    augment = train_transform(backbone.input, size, run.augment, run.dataset.crop_pct)
    plain = eval_transform(backbone.input, size, run.dataset.crop_pct)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    pixels[:, :20] //= 4  # a structured image: flips and shifts change it
    image = Image.fromarray(pixels)

    torch.manual_seed(0)
    outs = [augment(image) for _ in range(6)]
    for out in outs:
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j]), (i, j)
    torch.manual_seed(0)
    assert torch.equal(augment(image), outs[0])  # seeded: runs are reproducible
    assert torch.equal(plain(image), plain(image))
    assert not torch.equal(plain(image), outs[0])

    splits = build_splits(run.dataset, run.augment, backbone.input, size)
    a, b = splits.train[0][0], splits.train[0][0]
    assert a.shape == (3, size, size) and not torch.equal(a, b)
    assert torch.equal(splits.val[0][0], splits.val[0][0])
