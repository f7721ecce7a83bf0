"""Freeze policies: selectors, stage plans, requires_grad, BatchNorm modes and the stage table."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferlab.config import (
    FreezeConfig,
    SelectorSpec,
    StageSpec,
    make_config,
)
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.errors import UserError
from transferlab.infra.runtime import Precision
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import (
    apply_stage,
    frozen_batchnorms,
    plan_stages,
    resolve_selector,
    set_train_mode,
)
from transferlab.staging.summary import stage_rows, stage_table

from .conftest import TINY_CLASSES, TINY_SIZE, params_under, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")






def sel(select: str, lr: float | None = None, lr_mult: float = 1.0) -> SelectorSpec:
    return SelectorSpec(select=select, lr=lr, lr_mult=lr_mult)


def stage(name: str, epochs: int, *train, bn: str = "frozen", reset: bool = False) -> StageSpec:
    specs = [t if isinstance(t, SelectorSpec) else sel(t) for t in train]
    return StageSpec(name=name, epochs=epochs, train=specs, bn=bn, reset_optimizer=reset)


def policy(*stages: StageSpec) -> FreezeConfig:
    return FreezeConfig(name="test", stages=list(stages))


def one_plan(model, backbone, *train, bn: str = "frozen", base_lr: float = 1e-3):
    return plan_stages(model, backbone, policy(stage("s", 1, *train, bn=bn)), base_lr)[0]


def random_loader(n: int = 24, batch_size: int = 8, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, TINY_SIZE, TINY_SIZE, generator=g) * 2 + 0.5
    y = torch.randint(0, TINY_CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def in_model_order(model: nn.Module, wanted: set[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if n in wanted]


def block_params(model, backbone, blocks) -> list[str]:
    wanted: set[str] = set()
    for block in blocks:
        for path in block.paths:
            wanted |= params_under(backbone.module, path)
    return in_model_order(model, wanted)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_epochs(model, plan, epochs: int = 2) -> None:
    optimizer = stage_optimizer(model, plan, make_config("optimizer", "adam", lr=1e-2), None)
    precision = Precision(torch.device("cpu"), "off")
    loader = random_loader()
    for _ in range(epochs):
        set_train_mode(model, plan)
        stats = train_epoch(model, loader, CrossEntropy(), optimizer,
                            EpochContext(torch.device("cpu"), precision))
        assert stats.samples == len(loader.dataset)
    assert optimizer.state, "the optimizer took no step"


# --- linear probe: the frozen backbone stays bit-identical --------------------------------------


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_linear_probe_keeps_backbone_params_and_buffers_bit_identical(head):
    model, backbone = tiny_model(head)
    plan = one_plan(model, backbone, "head", bn="frozen")
    apply_stage(model, plan)
    backbone_before = snapshot(model.backbone)
    head_before = snapshot(model.head)
    assert any(k.endswith("running_mean") for k in backbone_before)  # the test means something

    run_epochs(model, plan)

    backbone_after = model.backbone.state_dict()
    assert backbone_after.keys() == backbone_before.keys()
    changed = [k for k in backbone_before if not torch.equal(backbone_before[k], backbone_after[k])]
    assert changed == [], f"frozen backbone tensors changed: {changed}"
    for name, param in model.head.named_parameters():
        assert not torch.equal(param, head_before[name]), f"head.{name} did not train"


def test_bn_train_updates_running_stats_of_a_frozen_backbone():
    model, backbone = tiny_model()
    plan = one_plan(model, backbone, "head", bn="train")
    apply_stage(model, plan)
    before = snapshot(model.backbone)
    params_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}

    run_epochs(model, plan)

    after = model.backbone.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        assert not torch.equal(before[key], after[key]), f"{key} did not update with bn=train"
    counts = [k for k in before if k.endswith("num_batches_tracked")]
    loader_steps = 2 * len(random_loader())
    for key in counts:
        assert int(after[key]) == int(before[key]) + loader_steps
    for name, param in model.backbone.named_parameters():
        assert torch.equal(param, params_before[name]), f"frozen parameter {name} changed"


def test_bn_frozen_freezes_only_the_frozen_blocks_batchnorm():
    model, backbone = tiny_model()
    plan = one_plan(model, backbone, "blocks[-1]", "head", bn="frozen")
    apply_stage(model, plan)
    trained = set(block_params(model, backbone, backbone.blocks[-1:]))
    set_train_mode(model, plan)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            owns_trained = any(n.startswith(name + ".") for n in trained)
            assert module.training == owns_trained, name
    assert set(frozen_batchnorms(model)) == {
        n for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not any(p.startswith(n + ".") for p in trained)
    }
    before = snapshot(model)
    run_epochs(model, plan, epochs=1)
    after = model.state_dict()
    for key, value in before.items():
        module = key.rsplit(".", 1)[0]
        is_trained = any(p.startswith(module + ".") for p in trained) or key.startswith("head.")
        if is_trained:
            continue
        assert torch.equal(value, after[key]), f"{key} of a frozen block changed"
    trained_stats = [k for k in before if k.endswith("running_mean")
                     and any(p.startswith(k.rsplit(".", 1)[0] + ".") for p in trained)]
    assert trained_stats
    assert all(not torch.equal(before[k], after[k]) for k in trained_stats)


# --- selectors ----------------------------------------------------------------------------------


def _head(model, backbone):
    return ["head." + n for n, _ in model.head.named_parameters()]


def _backbone(model, backbone):
    return ["backbone." + n for n, _ in backbone.module.named_parameters()]


def _glob_blocks0(model, backbone):
    return in_model_order(model, params_under(backbone.module, "blocks.0"))


SELECTORS = {
    "head": _head,
    "backbone": _backbone,
    "blocks[-2:]": lambda m, b: block_params(m, b, b.blocks[-2:]),
    "blocks[0]": lambda m, b: block_params(m, b, b.blocks[:1]),
    "blocks[-1]": lambda m, b: block_params(m, b, b.blocks[-1:]),
    "blocks[1:3]": lambda m, b: block_params(m, b, b.blocks[1:3]),
    " blocks[ :2 ] ": lambda m, b: block_params(m, b, b.blocks[:2]),
    "backbone.blocks.0.*": _glob_blocks0,
    "backbone.conv_head": lambda m, b: in_model_order(m, params_under(b.module, "conv_head")),
    "backbone.bn2.weight": lambda m, b: ["backbone.bn2.weight"],
    "*.bias": lambda m, b: [n for n, _ in m.named_parameters() if n.endswith(".bias")],
}


@pytest.mark.parametrize("selector", list(SELECTORS))
def test_selector_resolves_to_expected_parameters(selector):
    model, backbone = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    expected = SELECTORS[selector](model, backbone)
    assert expected and len(expected) < len(names)  # a real, proper subset
    assert resolve_selector(selector, names, backbone) == expected


@pytest.mark.parametrize("selector", list(SELECTORS))
def test_apply_stage_trains_exactly_the_selection(selector):
    model, backbone = tiny_model()
    expected = set(SELECTORS[selector](model, backbone))
    for i, (_, param) in enumerate(model.named_parameters()):  # a mixed starting state
        param.requires_grad_(i % 2 == 0)
    plan = one_plan(model, backbone, selector)
    assert plan.trainable() == expected
    apply_stage(model, plan)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected


def test_block_selectors_differ_from_module_globs():
    """blocks[0] is the first *block* (the stem), not timm's module ``blocks.0``."""
    model, backbone = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    by_block = resolve_selector("blocks[0]", names, backbone)
    by_glob = resolve_selector("backbone.blocks.0.*", names, backbone)
    assert by_block and by_glob and not set(by_block) & set(by_glob)


def test_block_selectors_partition_the_backbone():
    model, backbone = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    n_blocks = len(backbone.blocks)
    per_block = [resolve_selector(f"blocks[{i}]", names, backbone) for i in range(n_blocks)]
    flat = [n for block in per_block for n in block]
    assert all(per_block)
    assert sorted(flat) == sorted(resolve_selector("backbone", names, backbone))
    assert len(flat) == len(set(flat))
    assert resolve_selector(f"blocks[-{n_blocks}]", names, backbone) == per_block[0]


# --- plan_stages ---------------------------------------------------------------------------------


def test_plan_group_learning_rates():
    model, backbone = tiny_model()
    base_lr = 2e-3
    plan = one_plan(model, backbone, sel("head", lr_mult=10.0), sel("blocks[-1]", lr=0.05),
                    sel("blocks[-2]", lr=0.2, lr_mult=100.0), sel("blocks[-3]"),
                    base_lr=base_lr)
    lrs = {g.name: g.lr for g in plan.groups}
    assert lrs == {
        "head": pytest.approx(base_lr * 10.0),
        "blocks[-1]": pytest.approx(0.05),
        "blocks[-2]": pytest.approx(0.2),  # an absolute lr wins over lr_mult
        "blocks[-3]": pytest.approx(base_lr),
    }
    blocks = backbone.blocks
    members = {"head": _head(model, backbone),
               "blocks[-1]": block_params(model, backbone, [blocks[-1]]),
               "blocks[-2]": block_params(model, backbone, [blocks[-2]]),
               "blocks[-3]": block_params(model, backbone, [blocks[-3]])}
    assert {g.name: g.param_names for g in plan.groups} == members


def test_plan_epoch_ranges_of_consecutive_stages():
    model, backbone = tiny_model()
    epochs = [2, 3, 1, 4]
    plans = plan_stages(model, backbone, policy(
        *(stage(f"s{i}", e, "head") for i, e in enumerate(epochs))), 1e-3)
    assert [p.index for p in plans] == list(range(len(epochs)))
    assert [p.name for p in plans] == [f"s{i}" for i in range(len(epochs))]
    expected_first, first = [], 1
    for e in epochs:
        expected_first.append(first)
        first += e
    assert [p.first_epoch for p in plans] == expected_first
    assert [p.last_epoch for p in plans] == [f + e - 1 for f, e in zip(expected_first, epochs,
                                                                       strict=True)]
    assert plans[-1].last_epoch == sum(epochs)


@pytest.mark.parametrize("selector", ["backbone.nonexistent.*", "backbone.conv_heda", "heads"])
def test_selector_matching_nothing_is_a_one_line_user_error(selector):
    model, backbone = tiny_model()
    with pytest.raises(UserError) as exc:
        one_plan(model, backbone, "head", selector)
    message = str(exc.value)
    assert "\n" not in message
    assert repr(selector) in message
    assert "'s'" in message  # the stage


def test_no_match_error_suggests_nearest_name():
    model, backbone = tiny_model()
    with pytest.raises(UserError, match="backbone.conv_head"):
        one_plan(model, backbone, "backbone.conv_heda")


def test_conflicting_learning_rates_for_one_parameter_are_a_user_error():
    model, backbone = tiny_model()
    with pytest.raises(UserError) as exc:
        one_plan(model, backbone, sel("backbone"), sel("blocks[-1]", lr_mult=0.1))
    message = str(exc.value)
    assert "\n" not in message
    assert "'backbone'" in message and "'blocks[-1]'" in message
    first_shared = block_params(model, backbone, backbone.blocks[-1:])[0]
    assert first_shared in message


def test_overlapping_selectors_with_the_same_lr_are_deduplicated():
    model, backbone = tiny_model()
    plan = one_plan(model, backbone, sel("backbone"), sel("blocks[-1]", lr=1e-3), sel("head"),
                    base_lr=1e-3)
    flat = [n for g in plan.groups for n in g.param_names]
    assert len(flat) == len(set(flat))
    assert set(flat) == {n for n, _ in model.named_parameters()}
    assert [g.name for g in plan.groups] == ["backbone", "head"]  # nothing fresh: no group
    # torch refuses a parameter in two groups: building the optimizer proves no duplicates
    apply_stage(model, plan)
    stage_optimizer(model, plan, make_config("optimizer", "adam"), None)


def test_out_of_range_block_index_is_a_user_error():
    model, backbone = tiny_model()
    n = len(backbone.blocks)
    one_plan(model, backbone, f"blocks[{n - 1}]")
    one_plan(model, backbone, f"blocks[-{n}]")
    for bad in (f"blocks[{n}]", f"blocks[-{n + 1}]"):
        with pytest.raises(UserError) as exc:
            one_plan(model, backbone, bad)
        assert repr(bad) in str(exc.value)
        assert str(n) in str(exc.value)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("bad", ["blocks[a]", "blocks[1:2:3]", "blocks[5:1]"])
def test_malformed_or_empty_block_selector_is_a_user_error(bad):
    model, backbone = tiny_model()
    with pytest.raises(UserError, match=r"blocks\["):
        one_plan(model, backbone, bad)


# --- the stage table ---------------------------------------------------------------------------


@pytest.mark.parametrize("train", [["head"], ["blocks[-2:]", "head"], ["backbone.bn2.weight"],
                                   ["backbone", "head"]])
def test_stage_rows_count_trainable_parameters(train):
    model, backbone = tiny_model("mlp")
    plan = one_plan(model, backbone, *train)
    apply_stage(model, plan)
    rows = stage_rows(model, backbone, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert [r.part for r in rows] == [b.name for b in backbone.blocks] + ["head"]
    assert sum(r.trainable for r in rows) == trainable
    assert sum(r.params for r in rows) == total
    selected = plan.trainable()
    for block, row in zip(backbone.blocks, rows, strict=False):
        names = block_params(model, backbone, [block])
        assert row.params == sum(model.get_parameter(n).numel() for n in names)
        n_train = sum(model.get_parameter(n).numel() for n in names if n in selected)
        assert row.trainable == n_train
        if n_train == 0:
            assert row.lr == "-"
            assert row.bn == "eval"  # every block of the test model has BatchNorm
        else:
            assert row.lr == "0.001"
    table = stage_table(model, backbone, plan)
    assert f"trainable: {trainable:,}" in table
    assert f"non-trainable: {total - trainable:,}" in table
    assert f"total params: {total:,}" in table
    for row in rows:
        line = next(x for x in table.splitlines() if x.startswith(row.part + " "))
        state = "frozen" if row.trainable == 0 else (
            "trainable" if row.trainable == row.params else "partial")
        assert state in line.split()


def test_stage_rows_bn_column_follows_the_stage_bn_mode():
    model, backbone = tiny_model()
    # BN column: what the layers do (eval: stored statistics; train: batch statistics).
    expected = {"frozen": ("eval", "train"), "train": ("train", "train"), "eval": ("eval", "eval")}
    for bn, (frozen_rows, trained_row) in expected.items():
        plan = one_plan(model, backbone, "blocks[-1]", "head", bn=bn)
        apply_stage(model, plan)
        rows = stage_rows(model, backbone, plan)
        assert [r.bn for r in rows[:-2]] == [frozen_rows] * (len(rows) - 2)
        assert rows[-2].bn == trained_row  # the trained block
        assert rows[-1].bn == "-"  # the linear head has no BatchNorm
