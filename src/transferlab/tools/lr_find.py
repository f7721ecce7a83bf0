"""``transferlab-lr-find``: a learning-rate range test for one stage of the freeze policy.

    transferlab-lr-find dataset=hymenoptera freeze=two_stage stage=finetune
    transferlab-lr-find backbone=resnet18 freeze=discriminative end_lr=1 steps=100
    transferlab-lr-find --help                                     # every argument

The run is composed from the same overrides as ``transferlab-train`` and built by the same
build step. For the chosen stage the finder does what training does at that stage's start:
exactly its trainable parameters (:func:`~transferlab.staging.policy.apply_stage`), its
BatchNorm modes (:func:`~transferlab.staging.policy.set_train_mode`) and its optimizer with its
parameter groups (:func:`~transferlab.staging.optim.stage_optimizer`). It then sweeps the
BASE learning rate (``optimizer.lr``) exponentially from ``start_lr`` to ``end_lr`` over
``steps`` optimizer steps (cycling the loader); every group keeps its ratio to the base (a
two_stage finetune
group at ``finetune_lr_mult`` x base, a layer-decayed block at ``decay^k`` x base, a selector
with an absolute ``lr`` at its ratio to ``optimizer.lr``). The stage's own LR schedule is not
used. The sweep stops when the smoothed loss exceeds ``diverge`` x its best (or is not finite).

The range test runs on the engine's training pass (:func:`~transferlab.engine.epoch.
train_epoch`), as the run's loop would: the run's loss (with its penalty, e.g. L2-SP), its
loaders (MixUp / CutMix where ``augment`` mixes), its gradient accumulation (a sweep step is
one optimizer step of ``accumulate_grad_batches`` batches) and its clipping.

Earlier stages: by default (``warmup=false``) the finder runs on the model as built (pretrained
backbone, new head), as torch-lr-finder and fastai do. ``warmup=true`` first trains the stages
before the chosen one with the run's own staged engine (:func:`~transferlab.engine.stages.
fit_stages`: their epochs, LRs, schedules, accumulation, clipping, feature cache, early
stopping; the optimizer state carries over into the chosen stage as in training), e.g. the
head of a two_stage run before its finetune stage is probed: the same weights, bit for bit,
as the run's after those stages.

Afterwards the model and the optimizer are restored exactly (state dicts incl. BatchNorm
buffers, requires_grad, train/eval modes, gradients, the RNG states).

Suggested LR (rule ``steepest``, default): the LR where the smoothed loss falls fastest
(most negative slope against log LR), looking only at the part of the curve before its minimum
and skipping its first tenth (torch-lr-finder's suggestion, restricted to the descent).
Rule ``min10``: a tenth of the LR at the smoothed loss's minimum (fastai's ``lr_min``).

Writes into ``output=<dir>`` (default ``outputs/lr_find/<date>/<time>_<name>-<stage>``):
``lr_find.json`` (lrs, losses, smoothed, suggestion, rule, stage, groups), ``lr_find.png``
(loss against LR, log x, the suggestion marked) and ``tb/`` (``lr_find/loss``,
``lr_find/smoothed_loss`` and ``lr_find/lr`` by step).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferlab.choices import LR_RULE_TEXT, LR_RULES
from transferlab.config import RunConfig, TwoStageConfig
from transferlab.data import epoch_order
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import Objective, train_epoch
from transferlab.engine.hooks import Distributed, EarlyStop, Hook, NullRecorder
from transferlab.engine.ledger import FreezeLedger
from transferlab.engine.stages import fit_stages
from transferlab.engine.stepping import StepHooks, StepOptions
from transferlab.errors import UserError, did_you_mean
from transferlab.infra.runtime import Precision, rng_state, seed_everything, set_rng_state
from transferlab.run.build import BuiltRun, build_run, stage_loop
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import StagePlan, apply_stage, set_train_mode

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("transferlab")

JSON_NAME, PNG_NAME = "lr_find.json", "lr_find.png"

@dataclass
class RangeTest:
    """What a sweep recorded: ``losses[i]`` is the loss of the batch stepped at base LR
    ``lrs[i]`` (computed before that step)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str  # "completed" | "diverged" | "not finite"
    group_mults: dict[str, float] = field(default_factory=dict)  # group -> its lr / base lr


@dataclass
class LRFindResult:
    test: RangeTest
    suggestion: float | None
    rule: str
    stage: StagePlan
    built: BuiltRun | None = None

    def as_dict(self, settings: dict) -> dict:
        return {"stage": {"index": self.stage.index, "number": self.stage.index + 1,
                          "name": self.stage.name},
                "rule": self.rule, "rule_text": LR_RULE_TEXT[self.rule],
                "suggestion": self.suggestion, "stopped": self.test.stopped,
                "group_lr_mults": self.test.group_mults, "settings": settings,
                "lrs": self.test.lrs, "losses": self.test.losses,
                "smoothed": self.test.smoothed}


# -- the sweep -----------------------------------------------------------------------------------
class _Snapshot:
    """Everything a sweep changes, copied so that :meth:`restore` puts it back bit for bit."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: Precision | None):
        self.model = copy.deepcopy(model.state_dict())
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.scaler = copy.deepcopy(precision.scaler.state_dict()) if precision else None
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.grads = {n: None if p.grad is None else p.grad.detach().clone()
                      for n, p in model.named_parameters()}
        self.training = {n: m.training for n, m in model.named_modules()}
        self.rng = rng_state()

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                precision: Precision | None) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)  # groups' lrs and state (fresh: none)
        if precision is not None and self.scaler:
            precision.scaler.load_state_dict(self.scaler)
        modules = dict(model.named_modules())
        for name, param in model.named_parameters():
            param.requires_grad_(self.requires_grad[name])
            param.grad = self.grads[name]
        for name, training in self.training.items():
            modules[name].training = training
        set_rng_state(self.rng)


def _batches(loader: Iterable) -> Iterable:
    """The loader's batches, again and again (a loader with a :class:`ResumableSampler` draws
    a new order each pass; its epoch is put back afterwards)."""
    sampler = epoch_order(loader) if isinstance(loader, DataLoader) else None
    epoch = getattr(sampler, "epoch", None)
    passes = 0
    try:
        while True:
            if epoch is not None:
                sampler.set_epoch(epoch + passes)
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                raise UserError("lr_find: the training split yields no batch")
            passes += 1
    finally:
        if epoch is not None:
            sampler.set_epoch(epoch)


def check_settings(start_lr: float, end_lr: float, smooth: float, diverge: float) -> None:
    if not 0 < start_lr < end_lr:
        raise UserError(f"start_lr={start_lr:g}, end_lr={end_lr:g}: need 0 < start_lr < end_lr")
    if not 0 < smooth <= 1:
        raise UserError(f"smooth={smooth:g}: the weight of each new loss must be in (0, 1]")
    if diverge <= 1:
        raise UserError(f"diverge={diverge:g}: must be > 1 (stop at diverge x the best loss)")


class _Cycle:
    """``batches`` batches of ``loader``, again and again (sized, for the training pass)."""

    def __init__(self, loader: Iterable, batches: int):
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        source = _batches(self.loader)
        try:
            yield from itertools.islice(source, self.batches)
        finally:
            source.close()  # the loader's epoch back


class _Sweep(StepHooks):
    """The range test's step hooks: each optimizer step's base LR (exponential), its loss
    recorded and smoothed, a stop once the smoothed loss diverges."""

    def __init__(self, optimizer, base_lr: float, start_lr: float, end_lr: float, steps: int,
                 smooth: float, diverge: float, on_step):
        # each group's multiplier as its stage plan set it (``initial_lr``; a schedule's
        # factor left out), else as it stands
        self.mults = [g.get("initial_lr", g["lr"]) / base_lr for g in optimizer.param_groups]
        self.start_lr, self.ratio, self.steps = start_lr, end_lr / start_lr, steps
        self.smooth, self.diverge, self.on_step = smooth, diverge, on_step
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stopped, self.best, self.avg, self.lr = "completed", math.inf, None, start_lr

    def before_step(self, optimizer) -> None:
        i = len(self.lrs)
        self.lr = self.start_lr * self.ratio ** (i / max(self.steps - 1, 1))
        for group, mult in zip(optimizer.param_groups, self.mults, strict=True):
            group["lr"] = self.lr * mult

    def after_step(self, loss: float) -> None:
        self.avg = loss if self.avg is None else self.smooth * loss + (1 - self.smooth) * self.avg
        self.lrs.append(self.lr)
        self.losses.append(loss)
        self.smoothed.append(self.avg)
        if self.on_step is not None:
            self.on_step(len(self.lrs) - 1, self.lr, loss)
        self.best = min(self.best, self.avg)
        if self.avg > self.diverge * self.best:
            self.stopped = "diverged"

    def should_stop(self) -> bool:
        return self.stopped != "completed"


def range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable,
               objective: Objective, ctx: EpochContext, *, base_lr: float,
               start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
               smooth: float = 0.05, diverge: float = 4.0,
               stepping: StepOptions | None = None,
               penalty: Callable[[], torch.Tensor] | None = None,
               on_step: Callable[[int, float, float], None] | None = None) -> RangeTest:
    """Sweep the base LR of ``optimizer`` exponentially from ``start_lr`` to ``end_lr`` over
    ``steps`` optimizer steps on ``loader``'s batches, through the engine's training pass
    (:func:`~transferlab.engine.epoch.train_epoch`: the run's ``objective`` and ``penalty``,
    its gradient accumulation and clipping ``stepping``); each param group keeps its
    multiplier ``initial_lr / base_lr``. The caller has set requires_grad and train/eval
    modes (the stage's). ``losses[i]``: the mean objective of step i's samples. Stops when the
    smoothed loss (exponential moving average, weight ``smooth`` on the new loss) exceeds
    ``diverge`` x its best so far, or a loss is not finite. ``on_step(i, lr, loss)`` runs after
    each step. Afterwards the model, the optimizer (state and LRs), the grad scaler,
    requires_grad, train/eval modes, gradients and the RNG states are as they were."""
    check_settings(start_lr, end_lr, smooth, diverge)
    stepping = stepping or StepOptions()
    sweep = _Sweep(optimizer, base_lr, start_lr, end_lr, steps, smooth, diverge, on_step)
    group_mults = {}
    for group, mult in zip(optimizer.param_groups, sweep.mults, strict=True):
        group_mults.setdefault(group.get("name", "all"), mult)
    snapshot = _Snapshot(model, optimizer, ctx.precision)
    try:
        train_epoch(model, _Cycle(loader, steps * stepping.accumulate), objective, optimizer,
                    replace(ctx, progress=False), hooks=sweep, stepping=stepping,
                    penalty=penalty, desc="lr_find")
    except FloatingPointError:
        sweep.stopped = "not finite"
    finally:
        snapshot.restore(model, optimizer, ctx.precision)
    return RangeTest(sweep.lrs, sweep.losses, sweep.smoothed, sweep.stopped, group_mults)


# -- the suggestion ------------------------------------------------------------------------------
def check_rule(rule: str) -> None:
    """A suggestion rule of :data:`LR_RULES`, else one line naming them."""
    if rule not in LR_RULES:
        raise UserError(f"rule={rule!r}{did_you_mean(rule, LR_RULES)}; choose one of "
                        f"{', '.join(LR_RULES)}")


def suggest(lrs: list[float], smoothed: list[float], rule: str = "steepest") -> float | None:
    """The suggested base LR by ``rule`` (:data:`LR_RULES`), always one of the swept ``lrs``
    (None when the curve is too short to judge: fewer than 5 points before its minimum)."""
    check_rule(rule)
    if not lrs:
        return None
    low = int(np.argmin(smoothed))
    if rule == "min10":
        target = lrs[low] / 10
        return min(lrs, key=lambda lr: abs(math.log(lr / target)))
    skip = len(smoothed) // 10
    if low - skip < 4:
        return None
    logs = np.log10(np.asarray(lrs[skip:low + 1]))
    slope = np.gradient(np.asarray(smoothed[skip:low + 1]), logs)
    return lrs[skip + int(np.argmin(slope))]


# -- a stage of a built run ----------------------------------------------------------------------
def pick_stage(plans: list[StagePlan], stage: str | None, policy: str) -> StagePlan:
    """The plan that ``stage=`` names (its number, from 1 as a run's stage table prints it, or
    its name); None: the first stage that trains anything. ``policy``: where the stages come
    from, for messages (``freeze=two_stage``)."""
    listed = ", ".join(f"{p.index + 1} {p.name}" for p in plans)
    if stage is None:
        for plan in plans:
            if plan.spec.epochs > 0 and plan.groups:
                return plan
        raise UserError(f"{policy} trains nothing (stages: {listed})")
    if stage.lstrip("-").isdigit():
        number = int(stage)
        if not 1 <= number <= len(plans):
            raise UserError(f"stage={stage}: {policy} has stages {listed} (numbered from 1, as "
                            f"a run's stage table prints them); give stage=1..{len(plans)} or "
                            "a stage name")
        plan = plans[number - 1]
    else:
        names = [p.name for p in plans]
        if stage not in names:
            raise UserError(f"stage={stage!r}: {policy} has no such stage"
                            f"{did_you_mean(stage, names)}; its stages: {listed}")
        plan = plans[names.index(stage)]
    if not plan.groups:
        raise UserError(f"stage={stage}: stage {plan.name!r} trains nothing; its stages: {listed}")
    return plan


class _WarmUpLog(Hook):
    """One console line per warm-up epoch."""

    def on_epoch_end(self, loop) -> None:
        r = loop.record
        log.info("warm-up epoch %d [%s]: train loss %.4f | val loss %.4f", r["epoch"],
                 r["stage"], r["train_loss"], r["val_loss"])


def warmup_hooks(built: BuiltRun) -> list[Hook]:
    """The hooks of the run's loop that change what it trains (no record, no checkpoint):
    the stage's cached inputs, DDP, early stopping (its lines unrecorded), the freeze ledger."""
    quiet = NullRecorder()
    return [*built.task.input_hooks(built, quiet), Distributed(),
            EarlyStop(built.run.trainer.early_stopping, quiet), FreezeLedger(), _WarmUpLog()]


@dataclass
class StageSetup:
    """A built run at the start of one stage: the model with the stage's requires_grad and
    modes, the stage's optimizer, the training loader, what the run minimises and how it
    steps."""

    built: BuiltRun
    plan: StagePlan
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    objective: Objective
    stepping: StepOptions

    @property
    def model(self) -> nn.Module:
        return self.built.model

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective of one batch as training minimises it (the penalty included)."""
        loss, _ = self.objective(self.model, x, y, self.built.context)
        return loss if self.built.penalty is None else loss.float() + self.built.penalty()

    def range_test(self, **settings) -> RangeTest:
        built = self.built
        return range_test(self.model, self.optimizer, self.loader, self.objective,
                          built.context, base_lr=built.run.optimizer.lr, stepping=self.stepping,
                          penalty=built.penalty, **settings)


def prepare_stage(run: RunConfig, stage: str | None = None,
                  warmup: bool = False) -> StageSetup:
    """Build ``run`` as training does (seeded first) and set its model up for ``stage`` (an
    index or a name; None: the first stage that trains anything), after training the stages
    before it on the run's own engine when ``warmup``."""
    seed_everything(run.seed, run.trainer.deterministic)
    built = build_run(run)
    if built.model is None:
        raise UserError(f"task={run.task.name} is fitted in closed form (no learning rate): "
                        "there is nothing for lr_find to sweep")
    plan = pick_stage(built.plans, stage, built.task.policy_label(run))
    loop = stage_loop(built, warmup_hooks(built) if warmup else [])
    if warmup:
        loop.plans = built.plans[:plan.index]
        fit_stages(loop)
    model = built.model
    apply_stage(model, plan)
    set_train_mode(model, plan)
    optimizer = stage_optimizer(model, plan, run.optimizer, loop.optimizer)
    epoch_order(loop.train_loader).set_epoch(plan.first_epoch)
    return StageSetup(built, plan, optimizer, loop.train_loader, loop.train_objective,
                      loop.stepping)


def lr_find(run: RunConfig, stage: str | None = None, *, start_lr: float = 1e-7,
            end_lr: float = 10.0, steps: int = 200, smooth: float = 0.05,
            diverge: float = 4.0, rule: str = "steepest", warmup: bool = False) -> LRFindResult:
    """Build ``run`` as training does and run the range test for one stage of its freeze
    policy (see the module's docstring); returns the curve, the suggestion and the build."""
    check_rule(rule)
    check_settings(start_lr, end_lr, smooth, diverge)  # before anything is built
    setup = prepare_stage(run, stage, warmup)
    test = setup.range_test(start_lr=start_lr, end_lr=end_lr, steps=steps, smooth=smooth,
                            diverge=diverge)
    return LRFindResult(test, suggest(test.lrs, test.smoothed, rule), rule, setup.plan,
                        setup.built)


# -- outputs -------------------------------------------------------------------------------------
def plot(result: LRFindResult, path: Path, title: str = "") -> None:
    """Loss (raw, faint) and smoothed loss against the base LR (log x), the suggestion marked."""
    test = result.test
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(test.lrs, test.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(test.lrs, test.smoothed, color="tab:blue", label="smoothed loss")
    if result.suggestion is not None:
        i = test.lrs.index(result.suggestion)
        ax.plot([result.suggestion], [test.smoothed[i]], "o", color="tab:red", markersize=8,
                label=f"suggestion {result.suggestion:.2e} ({result.rule})")
        ax.axvline(result.suggestion, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate (optimizer.lr)")
    ax.set_ylabel("training loss")
    if test.smoothed:  # the descent in full; the diverged tail does not flatten it
        low = int(np.argmin(test.smoothed))
        bottom, top = min(test.losses[:low + 1]), max(test.smoothed[:low + 1])
        pad = 0.1 * (top - bottom) + 1e-3
        ax.set_ylim(bottom - pad, top + 4 * pad)
    ax.set_title(title or f"LR range test, stage {result.stage.name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: LRFindResult, out_dir: Path, settings: dict,
                  title: str = "") -> None:
    """``lr_find.json``, ``lr_find.png`` and the TensorBoard scalars in ``out_dir/tb``."""
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(result.as_dict(settings), indent=2))
    plot(result, out_dir / PNG_NAME, title)
    with SummaryWriter(log_dir=str(out_dir / "tb")) as writer:
        test = result.test
        for step, (lr, loss, avg) in enumerate(zip(test.lrs, test.losses, test.smoothed,
                                                   strict=True)):
            writer.add_scalar("lr_find/loss", loss, step)
            writer.add_scalar("lr_find/smoothed_loss", avg, step)
            writer.add_scalar("lr_find/lr", lr, step)


def apply_hint(run: RunConfig, result: LRFindResult) -> list[str]:
    """The override(s) that give the stage the suggested LR."""
    lr = result.suggestion
    lines = [f"optimizer.lr={lr:.3g}"]
    if isinstance(run.freeze, TwoStageConfig) and result.stage.index > 0:
        mult = lr * run.freeze.finetune_lr_mult / run.optimizer.lr
        lines.append(f"freeze.finetune_lr_mult={mult:.3g}  (keeps optimizer.lr="
                     f"{run.optimizer.lr:g} for the head stage)")
    return lines
