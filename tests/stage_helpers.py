"""What the stage tests share: the freeze presets and their knobs, tiny models and loaders,
one stage run, TensorBoard events, one-line errors."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferlab.backbones import build_backbone, probe_features
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.engine.stepping import StepCalls
from transferlab.infra.runtime import Precision, seed_everything
from transferlab.run.build import build_classifier
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, set_train_mode
from transferlab.staging.schedule import StageSchedule

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
