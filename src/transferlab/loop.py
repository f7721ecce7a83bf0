"""The plain PyTorch training and evaluation loops."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from transferlab.distributed import World
from transferlab.runtime import Precision
from transferlab.stepping import StepOptions, Stepper


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


class _Running:
    def __init__(self, sums: tuple[float, int, int] = (0.0, 0, 0)):
        self.loss_sum, self.correct, self.count = sums

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        hard = y.argmax(1) if y.ndim == 2 else y  # soft (mixed) targets: the dominant label
        self.loss_sum += float(loss) * n
        self.correct += int((logits.argmax(1) == hard).sum())
        self.count += n

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


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    fmt = torch.channels_last if channels_last and x.ndim == 4 else torch.contiguous_format
    non_blocking = device.type == "cuda"
    return (x.to(device, non_blocking=non_blocking, memory_format=fmt),
            y.to(device, non_blocking=non_blocking))


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, precision: Precision,
                    *, channels_last: bool = False, progress: bool = False, desc: str = "train",
                    before_step: Callable[[torch.optim.Optimizer], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    resume: EpochStats | None = None,
                    stepping: StepOptions | None = None,
                    after_step: Callable[[], None] | None = None,
                    penalty: Callable[[], torch.Tensor] | None = None) -> EpochStats:
    """One pass over ``loader``; the caller has set train/eval modes and requires_grad.

    ``before_step(optimizer)`` runs before every optimizer step (LR schedule, LR logging),
    ``after_step()`` after it (the EMA of the weights). Targets may be class indices or class
    probabilities (MixUp / CutMix); the accuracy then counts the dominant label.
    ``should_stop()`` is asked after every optimizer step: when true, the pass ends there
    (``stopped``). ``stepping``: gradient accumulation and clipping (:mod:`.stepping`).
    ``resume``: the stats of the part of this epoch done before an interrupt (the loader then
    yields the rest of the epoch's batches only). ``penalty()``: a term of the weights
    (:mod:`.regularize`) added to every batch's loss before backward; ``loss`` stays the data
    loss, the penalty's mean over the pass's batches is ``penalty``.
    """
    start = time.perf_counter() - (resume.seconds if resume else 0.0)
    running = _Running(resume.sums if resume else (0.0, 0, 0))
    steps = resume.steps if resume else 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
               initial=steps, total=len(loader))
    stepper = Stepper(optimizer, precision, len(loader), stepping, before_step)
    penalty_sum, batches = 0.0, 0
    for x, y in bar:
        x, y = _to_device(x, y, device, channels_last)
        stepper.begin(steps)
        with _grad_sync(model, stepper, steps):
            with precision.autocast():
                logits = model(x)
                loss = criterion(logits, y)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {float(loss.detach())} at step {steps + 1}")
            objective = loss
            if penalty is not None:
                term = penalty()
                objective = loss.float() + term
                penalty_sum, batches = penalty_sum + float(term.detach()), batches + 1
            stepped = stepper.backward(objective, y.shape[0], steps)
        if stepped and after_step is not None:
            after_step()
        running.update(loss.detach(), logits.detach(), y)
        steps += 1
        if progress:
            s = running.stats(0)
            bar.set_postfix(loss=f"{s.loss:.4f}", acc=f"{s.acc:.3f}")
        if stepped and should_stop is not None and should_stop():
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
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
             precision: Precision, *, channels_last: bool = False, progress: bool = False,
             desc: str = "val") -> EpochStats:
    """Loss and accuracy of ``model`` over ``loader``; leaves the model in eval mode."""
    model.eval()
    start, running = time.perf_counter(), _Running()
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x, y = _to_device(x, y, device, channels_last)
        with precision.autocast():
            logits = model(x)
            loss = criterion(logits, y)
        running.update(loss, logits, y)
    return running.stats(time.perf_counter() - start)


def recon_epoch(model: nn.Module, loader: DataLoader, device: torch.device,
                precision: Precision, optimizer: torch.optim.Optimizer | None = None,
                before_step: Callable[[torch.optim.Optimizer], None] | None = None,
                progress: bool = False, desc: str = "",
                should_stop: Callable[[], bool] | None = None,
                resume: EpochStats | None = None,
                stepping: StepOptions | None = None,
                after_step: Callable[[], None] | None = None) -> EpochStats:
    """One pass of an autoencoder (mean squared reconstruction error per image; ``acc`` is 0):
    a training pass when an ``optimizer`` is given, else an evaluation. Labels are ignored.
    ``should_stop``, ``resume``, ``stepping`` and ``after_step`` as for
    :func:`train_one_epoch`."""
    start = time.perf_counter() - (resume.seconds if resume else 0.0)
    total, _, count = resume.sums if resume else (0.0, 0, 0)
    steps = resume.steps if resume else 0
    model.train(optimizer is not None)
    stepper = (Stepper(optimizer, precision, len(loader), stepping, before_step)
               if optimizer is not None else None)
    with torch.set_grad_enabled(optimizer is not None):
        for x, _ in tqdm(loader, desc=desc, leave=False, disable=not progress,
                         dynamic_ncols=True):
            x = x.to(device, non_blocking=device.type == "cuda")
            if stepper is not None:
                stepper.begin(steps)
            sync = (_grad_sync(model, stepper, steps) if stepper is not None
                    else contextlib.nullcontext())
            with sync:
                with precision.autocast():
                    out = model(x)
                loss = F.mse_loss(out.float(), x.float())
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"loss is {float(loss)} at step {steps + 1}")
                stepped = stepper is not None and stepper.backward(loss, x.shape[0], steps)
            if stepped and after_step is not None:
                after_step()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
            steps += 1
            if stepped and should_stop is not None and should_stop():
                return _recon_stats(total, count, start, steps, True)
    return _recon_stats(total, count, start, steps, False)


def _recon_stats(total: float, count: int, start: float, steps: int,
                 stopped: bool) -> EpochStats:
    return EpochStats(total / max(count, 1), 0.0, count, time.perf_counter() - start, steps,
                      stopped, (total, 0, count))
