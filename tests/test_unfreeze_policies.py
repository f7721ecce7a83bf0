"""freeze=lp_ft (linear probe, then full fine-tuning from the probed head) and freeze=surgical
(one backbone block and the head): what trains, at which LR, and that the head carries over."""

from __future__ import annotations

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from torch import nn

from transferlab.config import load_config
from transferlab.engine import stages
from transferlab.errors import UserError
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.run import train
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages, set_train_mode

from .conftest import TINY
from .stage_helpers import block_params, build_model, head_params, is_bn, random_loader, torch_lrs

pytestmark = pytest.mark.usefixtures("one_thread")

N_BLOCKS = 7  # blocks of the tiny test model (timm test_efficientnet)


def lp_ft(compose_cfg, *extra: str):
    return compose_cfg([*TINY, "freeze=lp_ft", "freeze.probe_epochs=1",
                        "freeze.finetune_epochs=1", *extra])


def head_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


# --- LP-FT ---------------------------------------------------------------------------------------


def test_lp_ft_defaults_compose(compose_cfg):
    run = load_config(compose_cfg([*TINY, "freeze=lp_ft"]))
    f = run.freeze
    assert (f.probe_epochs, f.finetune_epochs, f.finetune_lr_mult, f.finetune_bn) == \
        (10, 10, 0.1, "eval")
    assert [(s.name, s.epochs, s.bn) for s in f.stages] == \
        [("probe", 10, "frozen"), ("finetune", 10, "eval")]


def test_lp_ft_stage_two_trains_everything_at_lr_times_mult(compose_cfg):
    base_lr, mult = 0.02, 0.25
    run = load_config(lp_ft(compose_cfg, f"optimizer.lr={base_lr}",
                            f"freeze.finetune_lr_mult={mult}"))
    model, backbone = build_model(run)
    every = {n for n, _ in model.named_parameters()}
    probe, finetune = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert (probe.name, finetune.name) == ("probe", "finetune")

    apply_stage(model, probe)
    lrs = torch_lrs(model, stage_optimizer(model, probe, run.optimizer, None))
    assert set(lrs) == head_params(model)
    assert all(lr == pytest.approx(base_lr, rel=1e-12) for lr in lrs.values())
    set_train_mode(model, probe)
    bns = {n: m for n, m in model.named_modules() if is_bn(m)}
    assert bns and not any(m.training for m in bns.values())  # the whole backbone is frozen

    apply_stage(model, finetune)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == every
    lrs = torch_lrs(model, stage_optimizer(model, finetune, run.optimizer, None))
    assert set(lrs) == every
    assert all(lr == pytest.approx(base_lr * mult, rel=1e-12) for lr in lrs.values())
    set_train_mode(model, finetune)  # finetune_bn=eval: statistics stay the pretrained ones
    assert model.training and not any(m.training for m in bns.values())


def test_lp_ft_finetune_bn_train_lets_statistics_update(compose_cfg):
    run = load_config(lp_ft(compose_cfg, "freeze.finetune_bn=train"))
    model, backbone = build_model(run)
    _, finetune = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    set_train_mode(model, finetune)
    assert all(m.training for m in model.modules() if is_bn(m))


@pytest.mark.slow
def test_lp_ft_keeps_the_probed_head(compose_cfg, tmp_path, monkeypatch):
    """The head at the start of stage 2 is the head at the end of stage 1 (epoch_1.pt), not a
    fresh one; stage 2 then trains it further."""
    starts: dict[str, dict[str, torch.Tensor]] = {}
    real_apply = stages.apply_stage

    def recording_apply(model, plan):  # observe only: the real function does the work
        starts[plan.name] = head_state(model)
        real_apply(model, plan)

    monkeypatch.setattr(stages, "apply_stage", recording_apply)
    cfg = lp_ft(compose_cfg, "trainer.keep_checkpoints=all", "trainer.batch_size=128",
                "optimizer.lr=0.01")
    train(cfg, tmp_path)
    assert list(starts) == ["probe", "finetune"]

    folder = tmp_path / "checkpoints"
    after_probe = load_checkpoint(folder / "epoch_1.pt")["model"]
    after_finetune = load_checkpoint(folder / "epoch_2.pt")["model"]
    probed = {k: after_probe[f"head.{k}"] for k in starts["finetune"]}
    assert any(not torch.equal(probed[k], starts["probe"][k]) for k in probed), \
        "stage 1 should have trained the head"
    for key, tensor in starts["finetune"].items():
        assert torch.equal(tensor, probed[key]), f"head {key} changed between the stages"
    assert any(not torch.equal(after_finetune[f"head.{k}"], probed[k]) for k in probed), \
        "stage 2 should train the probed head further"


# --- surgical ------------------------------------------------------------------------------------


def test_surgical_composes_with_a_block_and_hydra_range_sweeps(compose_cfg):
    run = load_config(compose_cfg([*TINY, "freeze=surgical", "freeze.block=3"]))
    assert run.freeze.block == 3
    (stage,) = run.freeze.stages
    assert [s.select for s in stage.train] == ["blocks[3]", "head"]
    assert stage.epochs == run.trainer.epochs and stage.bn == "frozen"
    (override,) = OverridesParser.create().parse_overrides(["freeze.block=range(0,7)"])
    assert override.is_sweep_override()
    assert list(override.sweep_iterator()) == list(range(N_BLOCKS))


@pytest.mark.parametrize("block", [3, -1])
def test_surgical_trains_exactly_one_block(block, compose_cfg):
    run = load_config(compose_cfg([*TINY, "freeze=surgical", f"freeze.block={block}",
                                   "optimizer.lr=0.01"]))
    model, backbone = build_model(run)
    assert len(backbone.blocks) == N_BLOCKS
    chosen = block_params(backbone, [backbone.blocks[block]])
    assert chosen
    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert plan.trainable() == chosen | head_params(model)

    apply_stage(model, plan)
    optimizer = stage_optimizer(model, plan, run.optimizer, None)
    set_train_mode(model, plan)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = next(iter(random_loader(run.dataset.image_size)))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    after = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    for name in params:
        same = torch.equal(after[name], before[name])
        if name in chosen or name.startswith("head."):
            assert not same, f"{name} of the chosen block (or the head) did not train"
        else:
            assert same, f"{name} outside blocks[{block}] changed"
    # BatchNorm statistics of the frozen blocks stay as they were
    frozen_stats = [k for k in before if k.endswith("running_mean")
                    and f"{k.rsplit('.', 1)[0]}.weight" not in chosen]
    assert frozen_stats
    for key in frozen_stats:
        assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("block", [N_BLOCKS, -N_BLOCKS - 1])
def test_surgical_block_out_of_range_is_a_one_line_user_error(block, compose_cfg):
    run = load_config(compose_cfg([*TINY, "freeze=surgical", f"freeze.block={block}"]))
    model, backbone = build_model(run)
    with pytest.raises(UserError) as excinfo:
        plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"freeze.block={block}" in message and f"{N_BLOCKS} blocks" in message
