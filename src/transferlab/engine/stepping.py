"""Optimizer steps of a training pass: gradient accumulation and gradient clipping.

``trainer.accumulate_grad_batches=k``: the optimizer steps every k batches, and after the
epoch's last batch for a short last group. Each micro-batch's (mean-reduced) loss counts by its
share of the group's samples, so a group equals one batch of all its samples: k batches of size
b give the step of one batch of size k·b, a short last group that of its own samples.

``trainer.gradient_clip_val`` / ``gradient_clip_algorithm`` (Lightning's names): before each
optimizer step (after unscaling under fp16 mixed precision), the gradients of the parameters
the optimizer trains are clipped to a total L2 norm (``norm``) or each to [-v, v] (``value``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from transferlab.infra.runtime import Precision


class StepHooks:
    """What a training pass calls around its optimizer steps (each a no-op here)."""

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Before the first batch of an optimizer step: the place to set its LR."""

    def on_grad_norm(self, norm: torch.Tensor) -> None:
        """The total grad norm before clipping (norm clipping only), before the step."""

    def after_step(self, loss: float) -> None:
        """After an optimizer step; ``loss``: the mean objective over the step's samples."""

    def should_stop(self) -> bool:
        """Asked after every optimizer step: True ends the pass there."""
        return False


@dataclass
class StepOptions:
    """How batches become optimizer steps (the trainer's settings)."""

    accumulate: int = 1  # batches per optimizer step
    clip_val: float | None = None  # None: no clipping
    clip_algorithm: str = "norm"  # norm | value

    @classmethod
    def from_trainer(cls, trainer) -> StepOptions:
        return cls(trainer.accumulate_grad_batches, trainer.gradient_clip_val,
                   trainer.gradient_clip_algorithm)

    def steps_per_epoch(self, batches: int) -> int:
        """Optimizer steps of an epoch of ``batches`` batches."""
        return math.ceil(batches / self.accumulate)


class Stepper:
    """One epoch's optimizer steps. For each batch (``index``: 0-based in the epoch):
    :meth:`begin` before its forward pass, :meth:`backward` with its loss after it; the latter
    says whether the optimizer stepped (a group ended: the place to stop an epoch part-way)."""

    def __init__(self, optimizer: torch.optim.Optimizer, precision: Precision, batches: int,
                 options: StepOptions | None = None, hooks: StepHooks | None = None):
        self.optimizer, self.precision, self.batches = optimizer, precision, batches
        self.options = options or StepOptions()
        self.hooks = hooks or StepHooks()
        self.first_size = 0  # samples of the group's first batch: b of the k x b it stands for
        self.seen = 0  # samples of the group so far
        self.loss_sum = 0.0  # the group's objective x samples (``after_step``'s mean)

    def _group_start(self, index: int) -> bool:
        return index % self.options.accumulate == 0

    def ends_group(self, index: int) -> bool:
        """Whether batch ``index``'s backward ends its group (the optimizer steps after it):
        under DDP the only backward whose gradients are averaged over the processes."""
        return (index + 1) % self.options.accumulate == 0 or index + 1 == self.batches

    def begin(self, index: int) -> None:
        if self._group_start(index):
            self.hooks.before_step(self.optimizer)  # the LR of this optimizer step
            self.optimizer.zero_grad(set_to_none=True)
            self.first_size, self.seen, self.loss_sum = 0, 0, 0.0

    def backward(self, loss: torch.Tensor, size: int, index: int, value: float) -> bool:
        """Backward of batch ``index``'s ``loss`` (``value``: its float, for ``after_step``)."""
        k = self.options.accumulate
        if self.first_size == 0:
            self.first_size = size
        self.seen += size
        self.loss_sum += value * size
        if k > 1:  # its share of the k x b samples a full group holds (corrected at the step)
            loss = loss * (size / (k * self.first_size))
        self.precision.scaler.scale(loss).backward()
        if not self.ends_group(index):
            return False
        self._step(k * self.first_size / self.seen if k > 1 else 1.0)
        self.hooks.after_step(self.loss_sum / self.seen)
        return True

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]
                if p.grad is not None]

    def _step(self, correction: float) -> None:
        opts, scaler = self.options, self.precision.scaler
        if correction != 1.0:  # a short last group: its mean over the samples it has
            for p in self._params():
                p.grad.mul_(correction)
        if opts.clip_val is not None:
            scaler.unscale_(self.optimizer)  # a no-op without fp16 scaling
            if opts.clip_algorithm == "norm":
                norm = torch.nn.utils.clip_grad_norm_(self._params(), opts.clip_val)
                self.hooks.on_grad_norm(norm)
            else:
                torch.nn.utils.clip_grad_value_(self._params(), opts.clip_val)
        scaler.step(self.optimizer)
        scaler.update()


@dataclass
class StepCalls(StepHooks):
    """Step hooks from plain functions (any of them None), e.g. for a notebook or a
    benchmark: ``StepCalls(before_step=schedule.apply)``."""

    before: Callable[[torch.optim.Optimizer], None] | None = None
    after: Callable[[float], None] | None = None
    grad_norm: Callable[[torch.Tensor], None] | None = None
    stop: Callable[[], bool] | None = None

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.before is not None:
            self.before(optimizer)

    def on_grad_norm(self, norm: torch.Tensor) -> None:
        if self.grad_norm is not None:
            self.grad_norm(norm)

    def after_step(self, loss: float) -> None:
        if self.after is not None:
            self.after(loss)

    def should_stop(self) -> bool:
        return self.stop is not None and self.stop()
