"""Per-stage learning-rate schedules: a multiplier of each group's LR at every step.

Each stage restarts its schedule; every param group keeps its own base LR (``initial_lr``,
set by the stage plan), so per-group and layer-decayed LRs keep their ratios throughout.
"""

from __future__ import annotations

import math

import torch

from transferlab.config.schema import (
    CosineSchedulerConfig,
    OneCycleSchedulerConfig,
    SchedulerConfig,
    StepSchedulerConfig,
)
from transferlab.registry import SCHEDULERS

# Each scheduler: multiplier(spec, t, span, steps_per_epoch) for step t (0-based) of the
# ``span`` steps after the warm-up.


def _constant(spec: SchedulerConfig, t: int, span: int, steps_per_epoch: int) -> float:
    return 1.0


def _cosine(spec: CosineSchedulerConfig, t: int, span: int, steps_per_epoch: int) -> float:
    progress = min(t / max(span - 1, 1), 1.0)
    return spec.min_lr_mult + (1 - spec.min_lr_mult) * 0.5 * (1 + math.cos(math.pi * progress))


def _step(spec: StepSchedulerConfig, t: int, span: int, steps_per_epoch: int) -> float:
    return spec.gamma ** (t // (spec.step_epochs * max(steps_per_epoch, 1)))


def _onecycle(spec: OneCycleSchedulerConfig, t: int, span: int, steps_per_epoch: int) -> float:
    start, end = 1 / spec.div_factor, 1 / (spec.div_factor * spec.final_div_factor)
    rise = max(int(spec.pct_start * span), 1)
    if t < rise:
        return _cos_interp(start, 1.0, t / rise)
    return _cos_interp(1.0, end, min((t - rise) / max(span - rise - 1, 1), 1.0))


def lr_multiplier(spec: SchedulerConfig, step: int, total_steps: int,
                  steps_per_epoch: int) -> float:
    """The LR multiplier for 0-based ``step`` of a stage of ``total_steps`` steps."""
    warmup = min(spec.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    t, span = step - warmup, max(total_steps - warmup, 1)
    return SCHEDULERS.builder(spec.name)(spec, t, span, steps_per_epoch)


def _cos_interp(a: float, b: float, progress: float) -> float:
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * progress))


class StageSchedule:
    """Sets every group's LR to ``initial_lr * multiplier`` before each step of a stage."""

    def __init__(self, spec: SchedulerConfig, epochs: int, steps_per_epoch: int):
        self.spec, self.steps_per_epoch = spec, steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.step = 0

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        mult = lr_multiplier(self.spec, self.step, self.total_steps, self.steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult
        self.step += 1
