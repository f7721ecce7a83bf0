"""``transferlab-lr-find``: the range test applies exactly the chosen stage (frozen set, BN
modes, groups and their LR multipliers), stops on divergence, restores model and optimizer bit
for bit, suggests an LR inside the swept range and writes its files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tests.conftest import TINY, compose_train
from transferlab.cli.lr_find import main
from transferlab.config import load_config
from transferlab.tools.lr_find import prepare_stage, suggest

# The tiny model on 80 digits (8 a class), batches of 16: 5 batches an epoch. No trainer.epochs:
# two_stage sets its own length.
BASE = [o for o in TINY if not o.startswith("trainer.epochs")] + [
    "dataset.samples_per_class=8", "trainer.batch_size=16", "trainer.device=cpu"]


def setup_for(overrides: list[str], stage: str | None = None, warmup: bool = False):
    run = load_config(compose_train([*BASE, *overrides]), [*BASE, *overrides])
    return prepare_stage(run, stage, warmup)


def sweep(setup, on_step=None, **kwargs):
    settings = dict(start_lr=1e-5, end_lr=1.0, steps=20)
    settings.update(kwargs)
    return setup.range_test(on_step=on_step, **settings)


def assert_same_tree(a, b, where="") -> None:
    """Nested dicts / lists / tensors equal bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_model_optimizer_and_rng_are_restored_bit_for_bit(one_thread):
    setup = setup_for(["freeze=two_stage"], stage="finetune")
    model, optimizer = setup.model, setup.optimizer
    # a few real steps first: Adam moments and BatchNorm statistics that must come back
    x, y = next(iter(setup.loader))
    for _ in range(2):
        optimizer.zero_grad()
        setup.loss(x, y).backward()
        optimizer.step()
    assert optimizer.state
    model_before = copy.deepcopy(model.state_dict())
    optim_before = copy.deepcopy(optimizer.state_dict())
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng_before = torch.get_rng_state()
    epoch = setup.loader.sampler.epoch
    moved = []

    def on_step(i, lr, loss):
        moved.append(any(not torch.equal(p, model_before[n])
                         for n, p in model.named_parameters() if p.requires_grad))

    objective = setup.objective

    def drawing(m, x, y, ctx):  # a dropout's draws from the global RNG (the tiny model has none)
        loss, out = objective(m, x, y, ctx)
        return loss + 0 * torch.rand(()), out

    setup.objective = drawing
    test = sweep(setup, on_step, end_lr=10.0)
    assert len(test.lrs) > 3 and all(moved)  # the sweep did change the weights
    assert_same_tree(model.state_dict(), model_before, "model")
    assert any(k.endswith("running_mean") for k in model_before)  # BN buffers compared
    assert_same_tree(optimizer.state_dict(), optim_before, "optimizer")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert setup.loader.sampler.epoch == epoch


@pytest.mark.slow
def test_frozen_blocks_never_change_during_the_sweep(one_thread):
    setup = setup_for(["freeze=two_stage", "freeze.fine_tune_at=-1"], stage="2")  # finetune
    model, plan = setup.model, setup.plan
    trainable = plan.trainable()
    frozen = {n for n, _ in model.named_parameters()} - trainable
    assert frozen and any(n.startswith("backbone.") for n in trainable)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    checked = []

    def on_step(i, lr, loss):
        state = model.state_dict()
        for name in frozen:
            assert torch.equal(state[name], before[name]), f"{name} moved at step {i}"
            # bn=frozen: the frozen BatchNorm layers keep their statistics too
            module = name.rpartition(".")[0]
            for buffer in ("running_mean", "running_var"):
                key = f"{module}.{buffer}"
                if key in state:
                    assert torch.equal(state[key], before[key]), f"{key} moved at step {i}"
        checked.append(any(not torch.equal(state[n], before[n]) for n in trainable))

    test = sweep(setup, on_step)
    assert len(checked) == len(test.lrs) == 20
    assert checked[-1]  # the trained blocks did move


@pytest.mark.slow
@pytest.mark.parametrize("overrides, stage", [
    (["freeze=discriminative", "freeze.decay=0.5"], None),
    (["freeze=two_stage", "freeze.finetune_lr_mult=0.25"], "finetune"),
])
def test_every_group_keeps_its_multiplier_of_the_base_lr(overrides, stage, one_thread):
    setup = setup_for(overrides, stage)
    base = setup.built.run.optimizer.lr
    expected = {g.name: g.lr / base for g in setup.plan.groups}
    assert len(set(expected.values())) > 1 or stage == "finetune"
    if stage == "finetune":
        assert set(expected.values()) == {0.25}
    seen = []

    def on_step(i, lr, loss):
        groups = setup.optimizer.param_groups
        assert {g["name"] for g in groups} == set(expected)
        for g in groups:
            assert g["lr"] == pytest.approx(lr * expected[g["name"]], rel=1e-12)
        seen.append(lr)

    test = sweep(setup, on_step)
    assert seen == test.lrs and test.lrs[0] == pytest.approx(1e-5)
    assert test.lrs[-1] == pytest.approx(1.0)  # exponential, from start_lr to end_lr
    ratios = [b / a for a, b in zip(test.lrs, test.lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))
    assert test.group_mults == pytest.approx(expected)


@pytest.mark.slow
def test_the_sweep_stops_when_the_loss_diverges(one_thread):
    setup = setup_for(["freeze=none", "trainer.epochs=1"])
    test = sweep(setup, start_lr=1e-3, end_lr=1e8, steps=100, smooth=0.5)
    assert test.stopped == "diverged" and len(test.lrs) < 100
    assert test.smoothed[-1] > 4 * min(test.smoothed)
    # ... at the first step over the line
    assert all(v <= 4 * min(test.smoothed[:i + 1]) for i, v in enumerate(test.smoothed[:-1]))


def test_suggestion_rules_on_a_known_curve():
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]  # 1e-6 .. 1
    # flat, a fall centred at 1e-3 (steepest there), a minimum near 1e-1, then a rise
    curve = [2 - math.tanh(3 * (math.log10(lr) + 3)) + 3 * max(0.0, math.log10(lr) + 1) ** 2
             for lr in lrs]
    steepest = suggest(lrs, curve, "steepest")
    assert 10 ** -3.2 < steepest < 10 ** -2.8
    low = lrs[curve.index(min(curve))]
    assert suggest(lrs, curve, "min10") == pytest.approx(low / 10, rel=0.1)
    assert suggest(lrs[:3], curve[:3]) is None  # too short to judge


@pytest.mark.slow
def test_command_writes_its_files_and_suggests_an_lr_inside_the_range(tmp_path, capsys,
                                                                      one_thread):
    out = tmp_path / "find"
    code = main([*BASE, "freeze=two_stage", "stage=1", "start_lr=1e-4", "end_lr=10",
                 "steps=20", "apply=true", f"output={out}"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("lr_find: ")
    data = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 0
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert len(data["lrs"]) == len(data["losses"]) == len(data["smoothed"]) > 0
    assert data["stage"] == {"index": 0, "number": 1, "name": "head"}
    assert data["rule"] == "steepest"
    assert " for stage 1 head (rule steepest" in printed[0]  # as the run's stage table
    assert data["suggestion"] is not None, data
    assert data["lrs"][0] <= data["suggestion"] <= data["lrs"][-1]
    assert printed[0].startswith(f"lr_find: suggested optimizer.lr={data['suggestion']:.3g} ")
    assert printed[1] == f"use: optimizer.lr={data['suggestion']:.3g}"


def test_the_swept_loss_includes_the_runs_l2sp_penalty(one_thread):
    plain = setup_for(["freeze=none"])
    l2sp = setup_for(["freeze=none", "trainer.regularize.name=l2sp",
                      "trainer.regularize.alpha=0.5", "trainer.regularize.beta=0.5"])
    x, y = next(iter(plain.loader))
    with torch.no_grad():
        data_loss = plain.loss(x, y)
        # the same seed builds the same model: the only difference is the penalty, which at
        # the starting weights is the head's beta term (the backbone has not moved from w0)
        penalty = float(l2sp.built.penalty())
        assert penalty > 0
        assert float(l2sp.loss(x, y)) == pytest.approx(
            float(data_loss) + penalty, rel=1e-6)
        for p in l2sp.model.backbone.parameters():  # move the backbone: the alpha term grows
            p.add_(0.01)
        assert float(l2sp.built.penalty()) > penalty


@pytest.mark.slow
def test_warmup_trains_the_earlier_stages_first(one_thread):
    overrides = ["freeze=two_stage", "freeze.head_epochs=1"]
    cold = setup_for(overrides, "finetune")
    warm = setup_for(overrides, "finetune", warmup=True)
    assert not cold.optimizer.state  # the model as built
    head = [n for n, _ in warm.model.named_parameters() if n.startswith("head.")]
    cold_state, warm_state = cold.model.state_dict(), warm.model.state_dict()
    assert all(not torch.equal(cold_state[n], warm_state[n]) for n in head)
    # the head's Adam moments carry into the finetune stage, as in training
    params = dict(warm.model.named_parameters())
    assert all(params[n] in warm.optimizer.state for n in head)


@pytest.mark.parametrize("stage, expected", [
    ("7", "stage=7: freeze=two_stage has stages 1 head, 2 finetune (numbered from 1, as a "
          "run's stage table prints them); give stage=1..2 or a stage name"),
    ("0", "stage=0: freeze=two_stage has stages 1 head, 2 finetune"),
    ("finetuen", "stage='finetuen': freeze=two_stage has no such stage (did you mean "
                 "'finetune'?)"),
])
def test_a_bad_stage_is_one_error_line_and_exit_2(stage, expected, capsys, tmp_path,
                                                  one_thread):
    code = main([*BASE, "freeze=two_stage", f"stage={stage}", f"output={tmp_path}/x"])
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {expected}"), line
    assert not (tmp_path / "x").exists()


def test_bad_settings_fail_before_anything_is_built(capsys):
    assert main([*BASE, "start_lr=1", "end_lr=0.1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "error: start_lr=1, end_lr=0.1: need 0 < start_lr < end_lr"


def test_help_lists_every_key(capsys):
    from transferlab.cli.args import help_text
    from transferlab.cli.lr_find import SPEC

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out == help_text(SPEC) + "\n" and out.startswith("usage: transferlab-lr-find ")
    for key in ("stage", "start_lr", "end_lr", "steps", "smooth", "diverge", "rule", "warmup",
                "apply", "output"):
        assert f"  {key}=" in out


def test_a_logreg_run_has_no_learning_rate_to_find(capsys, tmp_path, one_thread):
    base = [o for o in BASE if not o.startswith(("trainer.epochs", "freeze", "optimizer"))]
    assert main([*base, "task=logreg", f"output={tmp_path}/x"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("error: task=logreg is fitted in closed form (no learning rate): there is "
                    "nothing for lr_find to sweep")
