"""One pass over a loader: :func:`train_epoch` (optimizer steps) and :func:`evaluate`.

Both read top to bottom like torchvision's reference ``train_one_epoch``; what differs between
tasks is the :class:`Objective` (a classifier's cross-entropy, an autoencoder's reconstruction
error), and what happens around each optimizer step is a :class:`StepHooks` object (the LR
schedule, logging, the EMA of the weights, stop requests: :mod:`transferlab.engine.stages`
dispatches them to the run's hooks; the LR finder's range test brings its own).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from transferlab.engine.context import EpochContext
from transferlab.engine.progress import Progress
from transferlab.engine.stepping import StepHooks, StepOptions, Stepper
from transferlab.infra.distributed import World


@dataclass
class EpochStats:
    loss: float
    acc: float
    samples: int
    seconds: float
    steps: int = 0  # batches of the epoch done (a stopped epoch: fewer than the loader's)
    stopped: bool = False  # ended early by ``should_stop``
    sums: tuple[float, int, int] = (0.0, 0, 0)  # loss sum, correct, count: to go on later
    penalty: float | None = None  # the mean of ``penalty()`` over this pass's batches


class Objective:
    """What a task minimises: the loss of a batch, and the outputs its accuracy is counted on
    (None: no accuracy, e.g. a reconstruction)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: EpochContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class CrossEntropy(Objective):
    """A classifier's loss (any criterion of logits and targets; targets may be class indices
    or class probabilities: MixUp / CutMix), computed under the run's autocast."""

    def __init__(self, criterion: nn.Module | None = None):
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

    def __call__(self, model, x, y, ctx):
        with ctx.precision.autocast():
            logits = model(x)
            return self.criterion(logits, y), logits


class Reconstruction(Objective):
    """An autoencoder's loss: the mean squared error between its output and its input (as the
    loader gives it, normalised), in float32; labels are unused."""

    def __call__(self, model, x, y, ctx):
        with ctx.precision.autocast():
            out = model(x)
        return F.mse_loss(out.float(), x.float()), None


class _Running:
    def __init__(self, sums: tuple[float, int, int] = (0.0, 0, 0)):
        self.loss_sum, self.correct, self.count = sums

    def update(self, loss: float, logits: torch.Tensor | None, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss_sum += loss * n
        if logits is not None:
            hard = y.argmax(1) if y.ndim == 2 else y  # soft (mixed) targets: the dominant label
            self.correct += int((logits.argmax(1) == hard).sum())
        self.count += n

    def figures(self) -> dict[str, str]:
        """The running loss and accuracy, as a progress display shows them."""
        n = max(self.count, 1)
        return {"loss": f"{self.loss_sum / n:.4f}", "acc": f"{self.correct / n:.3f}"}

    def stats(self, seconds: float, steps: int = 0, stopped: bool = False) -> EpochStats:
        n = max(self.count, 1)
        return EpochStats(self.loss_sum / n, self.correct / n, self.count, seconds, steps,
                          stopped, (self.loss_sum, self.correct, self.count))


def reduced(stats: EpochStats, world: World) -> EpochStats:
    """``stats`` over every process's batches (DDP): loss, accuracy and count of the sums."""
    if not world.active:
        return stats
    loss_sum, correct, count = world.sum(stats.sums)
    n = max(count, 1)
    return replace(stats, loss=loss_sum / n, acc=correct / n, samples=int(count),
                   sums=(loss_sum, int(correct), int(count)))


def _grad_sync(model: nn.Module, stepper: Stepper, index: int):
    """Under DDP, the backward of a batch that does not end its accumulation group keeps its
    gradients local (``no_sync``): they are averaged with the group's last one."""
    if stepper.ends_group(index) or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def to_device(x: torch.Tensor, y: torch.Tensor, ctx: EpochContext):
    """A batch on the context's device (images channels-last where the context says so)."""
    device = ctx.device
    fmt = torch.channels_last if ctx.channels_last and x.ndim == 4 else torch.contiguous_format
    non_blocking = device.type == "cuda"
    return (x.to(device, non_blocking=non_blocking, memory_format=fmt),
            y.to(device, non_blocking=non_blocking))


def train_epoch(model: nn.Module, loader, objective: Objective,
                optimizer: torch.optim.Optimizer, ctx: EpochContext, *,
                hooks: StepHooks | None = None, stepping: StepOptions | None = None,
                resume: EpochStats | None = None, penalty=None,
                desc: str = "train") -> EpochStats:
    """One pass over ``loader``; the caller has set train/eval modes and requires_grad.

    ``hooks`` (:class:`~transferlab.engine.stepping.StepHooks`): ``before_step(optimizer)``
    before each optimizer step's first batch (its LR), ``after_step(loss)`` after the step
    (the mean objective of its samples), ``should_stop()`` asked after every optimizer step:
    when true, the pass ends there (``stopped``). ``stepping``: gradient accumulation and
    clipping (:mod:`.stepping`). ``resume``: the stats of the part of this epoch done before an
    interrupt (the loader then yields the rest of the epoch's batches only). ``penalty()``: a
    term of the weights (:mod:`transferlab.staging.regularize`) added to every batch's loss before
    backward; ``loss`` stays the data loss, the penalty's mean over the batches is ``penalty``.
    A loss that is not finite raises :class:`FloatingPointError` before its backward.
    """
    hooks = hooks or StepHooks()
    start = time.perf_counter() - (resume.seconds if resume else 0.0)
    running = _Running(resume.sums if resume else (0.0, 0, 0))
    steps = resume.steps if resume else 0
    bar = Progress(loader, desc, bar=ctx.progress, every=ctx.progress_every,
                   total=len(loader), initial=steps)
    stepper = Stepper(optimizer, ctx.precision, len(loader), stepping, hooks)
    penalty_sum, batches = 0.0, 0
    for x, y in bar:
        x, y = to_device(x, y, ctx)
        stepper.begin(steps)
        with _grad_sync(model, stepper, steps):
            loss, logits = objective(model, x, y, ctx)
            loss_value = float(loss.detach())  # the one host sync of the batch
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {steps + 1}")
            value, objective_value = loss, loss_value
            if penalty is not None:
                term = penalty()
                value = loss.float() + term
                term_value = float(term.detach())
                objective_value += term_value
                penalty_sum, batches = penalty_sum + term_value, batches + 1
            stepped = stepper.backward(value, y.shape[0], steps, objective_value)
        running.update(loss_value, None if logits is None else logits.detach(), y)
        steps += 1
        bar.update(y.shape[0], running.figures if bar.wants_postfix else None)
        if stepped and hooks.should_stop():
            bar.close()
            return _with_penalty(running.stats(time.perf_counter() - start, steps,
                                               stopped=True), penalty, penalty_sum, batches)
    return _with_penalty(running.stats(time.perf_counter() - start, steps), penalty,
                         penalty_sum, batches)


def _with_penalty(stats: EpochStats, penalty, total: float, batches: int) -> EpochStats:
    if penalty is not None:
        stats.penalty = total / max(batches, 1)
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, loader, objective: Objective, ctx: EpochContext,
             desc: str = "val") -> EpochStats:
    """Loss (and accuracy, where the objective has outputs to count) of ``model`` over
    ``loader``; leaves the model in eval mode."""
    model.eval()
    start, running = time.perf_counter(), _Running()
    bar = Progress(loader, desc, bar=ctx.progress, every=ctx.progress_every, total=len(loader))
    for x, y in bar:
        x, y = to_device(x, y, ctx)
        loss, logits = objective(model, x, y, ctx)
        running.update(float(loss), logits, y)
        bar.update(y.shape[0])
    bar.close()
    return running.stats(time.perf_counter() - start)
