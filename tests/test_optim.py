"""Optimizers over a stage's parameter groups: weight decay, learning rates, carried-over state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transferlab.config import (
    AdamConfig,
    AdamWConfig,
    FreezeConfig,
    RMSpropConfig,
    SelectorSpec,
    SGDConfig,
    StageSpec,
    load_config,
    make_config,
)
from transferlab.errors import UserError
from transferlab.registry import OPTIMIZERS as OPTIMIZER_REGISTRY
from transferlab.staging.optim import build_optimizer, stage_optimizer, torch_param_groups
from transferlab.staging.policy import apply_stage, plan_stages

from .conftest import CONF_DIR as CONF
from .conftest import TINY_CLASSES, TINY_SIZE, compose_train, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def stage(name: str, *train, epochs: int = 1, reset: bool = False) -> StageSpec:
    specs = [t if isinstance(t, SelectorSpec) else SelectorSpec(select=t) for t in train]
    return StageSpec(name=name, epochs=epochs, train=specs, reset_optimizer=reset)


def plans_for(model, backbone, *stages: StageSpec, base_lr: float = 1e-3):
    return plan_stages(model, backbone, FreezeConfig(name="test", stages=list(stages)), base_lr)


def loss_backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, TINY_SIZE, TINY_SIZE, generator=g)
    y = torch.randint(0, TINY_CLASSES, (4,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()


def take_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    model.train()
    for i in range(n):
        optimizer.zero_grad(set_to_none=True)
        loss_backward(model, seed + i)
        optimizer.step()


# --- torch_param_groups --------------------------------------------------------------------------


@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_param_groups_weight_decay_and_learning_rates(decay_norm_and_bias):
    model, backbone = tiny_model("mlp")
    plan = plans_for(model, backbone,
                     stage("s", SelectorSpec("blocks[-1]", lr=0.1),
                           SelectorSpec("head", lr_mult=3.0)), base_lr=1e-3)[0]
    apply_stage(model, plan)
    cfg = AdamWConfig(lr=1e-3, weight_decay=0.05,
                          decay_norm_and_bias=decay_norm_and_bias)
    groups = torch_param_groups(model, plan, cfg)
    lr_of = {"blocks[-1]": 0.1, "head": 3e-3}
    name_of = {id(p): n for n, p in model.named_parameters()}
    seen: list[str] = []
    for group in groups:
        assert group["name"] in lr_of
        assert group["lr"] == pytest.approx(lr_of[group["name"]])
        for p in group["params"]:
            seen.append(name_of[id(p)])
            wants_decay = decay_norm_and_bias or p.ndim >= 2
            assert group["weight_decay"] == (0.05 if wants_decay else 0.0), name_of[id(p)]
    assert len(seen) == len(set(seen))
    assert set(seen) == plan.trainable()
    assert {g["name"] for g in groups} == set(lr_of)
    n_no_decay = sum(g["weight_decay"] == 0.0 for g in groups)
    if decay_norm_and_bias:
        assert n_no_decay == 0
    else:  # BatchNorm weights and biases exist, so there are groups without decay
        assert n_no_decay >= 2
        assert any(p.ndim == 1 for g in groups if g["weight_decay"] == 0.0 for p in g["params"])
    # the optimizer keeps each group's own lr and weight decay (not the config's defaults)
    optimizer = build_optimizer(cfg, groups)
    for group, built in zip(groups, optimizer.param_groups, strict=True):
        assert built["lr"] == group["lr"]
        assert built["weight_decay"] == group["weight_decay"]
        assert built["name"] == group["name"]


def test_sgd_step_applies_group_lr_weight_decay_and_nesterov_momentum():
    """One SGD step, computed by hand: p - lr * (1 + m) * (g + wd * p) for nesterov."""
    model, backbone = tiny_model("linear")
    plan = plans_for(model, backbone,
                     stage("s", SelectorSpec("blocks[-1]", lr=0.5), "head"), base_lr=0.1)[0]
    apply_stage(model, plan)
    cfg = SGDConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    optimizer = stage_optimizer(model, plan, cfg, None)
    lr_of = {n: g.lr for g in plan.groups for n in g.param_names}
    model.eval()  # deterministic forward; the step is what is under test
    optimizer.zero_grad()
    loss_backward(model, seed=3)
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()
              if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    optimizer.step()
    params = dict(model.named_parameters())
    for n, (p0, grad) in before.items():
        wd = 0.1 if p0.ndim >= 2 else 0.0
        expected = p0 - lr_of[n] * 1.9 * (grad + wd * p0)
        torch.testing.assert_close(params[n].detach(), expected, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=n: f"{n}: {m}")
    for n, p0 in frozen_before.items():
        assert torch.equal(params[n], p0), n
        assert params[n].grad is None


# --- build_optimizer -----------------------------------------------------------------------------


OPTIMIZERS = [
    (AdamConfig(lr=1e-2), torch.optim.Adam, {}),
    (AdamWConfig(lr=1e-2, weight_decay=0.01, betas=[0.8, 0.99]),
     torch.optim.AdamW, {"betas": (0.8, 0.99)}),
    (SGDConfig(lr=1e-2, momentum=0.9, nesterov=True), torch.optim.SGD,
     {"momentum": 0.9, "nesterov": True}),
    (RMSpropConfig(lr=1e-3, momentum=0.5, alpha=0.9), torch.optim.RMSprop,
     {"momentum": 0.5, "alpha": 0.9}),
]


@pytest.mark.parametrize(("cfg", "cls", "settings"), OPTIMIZERS,
                         ids=[cfg.name for cfg, _, _ in OPTIMIZERS])
def test_each_optimizer_builds_and_steps(cfg, cls, settings):
    model, backbone = tiny_model("mlp")
    plan = plans_for(model, backbone, stage("s", "blocks[-2:]", "head"), base_lr=cfg.lr)[0]
    apply_stage(model, plan)
    optimizer = stage_optimizer(model, plan, cfg, None)
    assert type(optimizer) is cls
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(cfg.lr)
        for key, value in settings.items():
            assert group[key] == value, key
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_steps(model, optimizer, 2)
    after = dict(model.named_parameters())
    trainable = plan.trainable()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable
    assert changed, "no parameter moved"
    head_weight = next(n for n in trainable if n.startswith("head.") and after[n].ndim == 2)
    assert head_weight in changed


def test_every_optimizer_option_is_registered_with_its_schema():
    conf = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
    assert sorted(OPTIMIZER_REGISTRY.names()) == conf
    assert OPTIMIZER_REGISTRY.schema_of("sgd") is SGDConfig


def test_unknown_optimizer_is_a_user_error():
    model, backbone = tiny_model("mlp")
    plan = plans_for(model, backbone, stage("s", "head"))[0]
    cfg = make_config("optimizer", "adam")
    cfg.name = "lion"
    with pytest.raises(UserError) as exc:
        build_optimizer(cfg, torch_param_groups(model, plan, cfg))
    message = str(exc.value)
    assert "'lion'" in message and "adam" in message and "\n" not in message


def test_nesterov_without_momentum_is_a_user_error():
    overrides = ["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"]
    with pytest.raises(UserError, match="optimizer.nesterov=true needs optimizer.momentum > 0"):
        load_config(compose_train(overrides))


# --- stage_optimizer -----------------------------------------------------------------------------


def _state_copy(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v
            for k, v in optimizer.state[p].items()}


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_state_carries_over_to_the_next_stage(name):
    model, backbone = tiny_model("mlp")
    plans = plans_for(model, backbone,
                      stage("one", "blocks[-1]", "head"),
                      stage("two", "blocks[-2:]", "head"))
    params = dict(model.named_parameters())
    cfg = make_config("optimizer", name, lr=1e-2)

    apply_stage(model, plans[0])
    first = stage_optimizer(model, plans[0], cfg, None)
    take_steps(model, first, 3)
    kept = plans[0].trainable()
    saved = {n: _state_copy(first, params[n]) for n in kept}
    assert all(int(s["step"]) == 3 for s in saved.values())

    apply_stage(model, plans[1])
    second = stage_optimizer(model, plans[1], cfg, first)
    fresh = plans[1].trainable() - kept
    assert fresh  # blocks[-2] is newly unfrozen
    for n in kept:
        state = second.state.get(params[n], {})
        assert state, f"{n} lost its optimizer state"
        assert torch.equal(state["exp_avg"], saved[n]["exp_avg"]), n
        assert torch.equal(state["exp_avg_sq"], saved[n]["exp_avg_sq"]), n
    for n in fresh:
        assert len(second.state.get(params[n], {})) == 0, f"{n} should start without state"
    in_groups = {id(p) for g in second.param_groups for p in g["params"]}
    assert in_groups == {id(params[n]) for n in plans[1].trainable()}

    take_steps(model, second, 1, seed=10)
    for n in kept:  # the carried moments are the ones the new optimizer keeps updating
        assert int(second.state[params[n]]["step"]) == 4, n
    for n in fresh:
        assert int(second.state[params[n]]["step"]) == 1, n


@pytest.mark.parametrize("reset", [True, False])
def test_reset_optimizer_drops_all_state(reset):
    model, backbone = tiny_model("mlp")
    plans = plans_for(model, backbone, stage("one", "head"), stage("two", "head", reset=reset))
    cfg = AdamConfig(lr=1e-2)
    apply_stage(model, plans[0])
    first = stage_optimizer(model, plans[0], cfg, None)
    take_steps(model, first, 2)
    assert len(first.state) > 0
    apply_stage(model, plans[1])
    second = stage_optimizer(model, plans[1], cfg, first)
    head_params = list(model.head.parameters())
    if reset:
        assert len(second.state) == 0
        take_steps(model, second, 1)
        assert all(int(second.state[p]["step"]) == 1 for p in head_params)
    else:
        assert all(int(second.state[p]["step"]) == 2 for p in head_params)
