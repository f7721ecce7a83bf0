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

from transferlab.runtime import Precision


@dataclass
class StepOptions:
    """How batches become optimizer steps (the trainer's settings)."""

    accumulate: int = 1  # batches per optimizer step
    clip_val: float | None = None  # None: no clipping
    clip_algorithm: str = "norm"  # norm | value
    # called with the total grad norm before clipping (a 0-dim tensor), by norm clipping
    on_grad_norm: Callable[[torch.Tensor], None] | None = None

    @classmethod
    def from_trainer(cls, trainer, on_grad_norm=None) -> StepOptions:
        return cls(trainer.accumulate_grad_batches, trainer.gradient_clip_val,
                   trainer.gradient_clip_algorithm, on_grad_norm)

    def steps_per_epoch(self, batches: int) -> int:
        """Optimizer steps of an epoch of ``batches`` batches."""
        return math.ceil(batches / self.accumulate)


class Stepper:
    """One epoch's optimizer steps. For each batch (``index``: 0-based in the epoch):
    :meth:`begin` before its forward pass, :meth:`backward` with its loss after it; the latter
    says whether the optimizer stepped (a group ended: the place to stop an epoch part-way)."""

    def __init__(self, optimizer: torch.optim.Optimizer, precision: Precision, batches: int,
                 options: StepOptions | None = None,
                 before_step: Callable[[torch.optim.Optimizer], None] | None = None):
        self.optimizer, self.precision, self.batches = optimizer, precision, batches
        self.options = options or StepOptions()
        self.before_step = before_step
        self.first_size = 0  # samples of the group's first batch: b of the k x b it stands for
        self.seen = 0  # samples of the group so far

    def _group_start(self, index: int) -> bool:
        return index % self.options.accumulate == 0

    def ends_group(self, index: int) -> bool:
        """Whether batch ``index``'s backward ends its group (the optimizer steps after it):
        under DDP the only backward whose gradients are averaged over the processes."""
        return (index + 1) % self.options.accumulate == 0 or index + 1 == self.batches

    def begin(self, index: int) -> None:
        if self._group_start(index):
            if self.before_step is not None:
                self.before_step(self.optimizer)  # the LR of this optimizer step
            self.optimizer.zero_grad(set_to_none=True)
            self.first_size, self.seen = 0, 0

    def backward(self, loss: torch.Tensor, size: int, index: int) -> bool:
        k = self.options.accumulate
        if self.first_size == 0:
            self.first_size = size
        self.seen += size
        if k > 1:  # its share of the k x b samples a full group holds (corrected at the step)
            loss = loss * (size / (k * self.first_size))
        self.precision.scaler.scale(loss).backward()
        if not self.ends_group(index):
            return False
        self._step(k * self.first_size / self.seen if k > 1 else 1.0)
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
                if opts.on_grad_norm is not None:
                    opts.on_grad_norm(norm)
            else:
                torch.nn.utils.clip_grad_value_(self._params(), opts.clip_val)
        scaler.step(self.optimizer)
        scaler.update()
