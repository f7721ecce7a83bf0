"""``transferlab-lr-find``: a learning-rate range test for one stage of the freeze policy.

    transferlab-lr-find dataset=hymenoptera freeze=two_stage stage=finetune
    transferlab-lr-find backbone=resnet18 freeze=discriminative end_lr=1 steps=100
    transferlab-lr-find --help                                     # every argument

The run is composed from the same overrides as ``transferlab-train`` and built by the same
build step. For the chosen stage the finder does what training does at that stage's start:
exactly its trainable parameters (:func:`~transferlab.policy.apply_stage`), its BatchNorm
modes (:func:`~transferlab.policy.set_train_mode`) and its optimizer with its parameter groups
(:func:`~transferlab.optim.stage_optimizer`). It then sweeps the BASE learning rate
(``optimizer.lr``) exponentially from ``start_lr`` to ``end_lr`` over ``steps`` training
batches (cycling the loader); every group keeps its ratio to the base (a two_stage finetune
group at ``finetune_lr_mult`` x base, a layer-decayed block at ``decay^k`` x base, a selector
with an absolute ``lr`` at its ratio to ``optimizer.lr``). The stage's own LR schedule is not
used. The sweep stops when the smoothed loss exceeds ``diverge`` x its best (or is not finite).

Earlier stages: by default (``warmup=false``) the finder runs on the model as built (pretrained
backbone, new head), as torch-lr-finder and fastai do. ``warmup=true`` first trains the stages
before the chosen one as the run would (their epochs, LRs, schedules; the optimizer state
carries over into the chosen stage as in training), e.g. the head of a two_stage run before
its finetune stage is probed.

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
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from transferlab.cli import Key, Spec, boolean, number, parse, positive_int, run_main
from transferlab.config import RunConfig, TwoStageConfig, compose_config, load_config
from transferlab.data import make_loaders
from transferlab.errors import UserError, did_you_mean
from transferlab.loop import _to_device, train_one_epoch
from transferlab.optim import stage_optimizer
from transferlab.policy import StagePlan, apply_stage, set_train_mode
from transferlab.run.build import BuiltRun, build_run
from transferlab.run.tasks import train_criterion
from transferlab.run_dirs import claim
from transferlab.runtime import Precision, rng_state, seed_everything, set_rng_state
from transferlab.schedule import StageSchedule

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("transferlab")

RULES = ("steepest", "min10")
RULE_TEXT = {
    "steepest": "steepest descent of the smoothed loss against log lr, before its minimum",
    "min10": "a tenth of the lr at the smoothed loss's minimum",
}
JSON_NAME, PNG_NAME = "lr_find.json", "lr_find.png"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


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
        return {"stage": {"index": self.stage.index, "name": self.stage.name},
                "rule": self.rule, "rule_text": RULE_TEXT[self.rule],
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
    sampler = getattr(loader, "sampler", None)
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


def range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable,
               loss_fn: LossFn, device: torch.device, *, base_lr: float,
               start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
               smooth: float = 0.05, diverge: float = 4.0,
               precision: Precision | None = None, channels_last: bool = False,
               on_step: Callable[[int, float, float], None] | None = None) -> RangeTest:
    """Sweep the base LR of ``optimizer`` exponentially from ``start_lr`` to ``end_lr`` over
    ``steps`` batches of ``loader``; each param group keeps its multiplier
    ``initial_lr / base_lr``. The caller has set requires_grad and train/eval modes (the
    stage's). Stops when the smoothed
    loss (exponential moving average, weight ``smooth`` on the new loss) exceeds ``diverge`` x
    its best so far, or a loss is not finite. ``on_step(i, lr, loss)`` runs after each step.
    Afterwards the model, the optimizer (state and LRs), the grad scaler, requires_grad,
    train/eval modes, gradients and the RNG states are as they were."""
    check_settings(start_lr, end_lr, smooth, diverge)
    precision = precision or Precision(device, False)
    # each group's multiplier as its stage plan set it (``initial_lr``; a schedule's factor
    # left out), else as it stands
    mults = [group.get("initial_lr", group["lr"]) / base_lr for group in optimizer.param_groups]
    group_mults = {}
    for group, mult in zip(optimizer.param_groups, mults, strict=True):
        group_mults.setdefault(group.get("name", "all"), mult)
    snapshot = _Snapshot(model, optimizer, precision)
    lrs, losses, smoothed = [], [], []
    stopped, best, avg = "completed", math.inf, None
    ratio = end_lr / start_lr
    batches = _batches(loader)
    try:
        for i in range(steps):
            lr = start_lr * ratio ** (i / max(steps - 1, 1))
            for group, mult in zip(optimizer.param_groups, mults, strict=True):
                group["lr"] = lr * mult
            x, y = _to_device(*next(batches), device, channels_last)
            with precision.autocast():
                loss = loss_fn(model, x, y)
            value = float(loss.detach())
            if not math.isfinite(value):
                stopped = "not finite"
                break
            optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
            avg = value if avg is None else smooth * value + (1 - smooth) * avg
            lrs.append(lr)
            losses.append(value)
            smoothed.append(avg)
            if on_step is not None:
                on_step(i, lr, value)
            best = min(best, avg)
            if avg > diverge * best:
                stopped = "diverged"
                break
    finally:
        batches.close()  # the loader's epoch back
        snapshot.restore(model, optimizer, precision)
    return RangeTest(lrs, losses, smoothed, stopped, group_mults)


# -- the suggestion ------------------------------------------------------------------------------
def suggest(lrs: list[float], smoothed: list[float], rule: str = "steepest") -> float | None:
    """The suggested base LR by ``rule`` (:data:`RULES`), always one of the swept ``lrs``
    (None when the curve is too short to judge: fewer than 5 points before its minimum)."""
    if rule not in RULES:
        raise UserError(f"rule={rule!r}{did_you_mean(rule, RULES)}; choose one of "
                        f"{', '.join(RULES)}")
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
    """The plan that ``stage=`` names (an index or a name); None: the first stage that trains
    anything."""
    listed = ", ".join(f"{p.index} {p.name}" for p in plans)
    if stage is None:
        for plan in plans:
            if plan.spec.epochs > 0 and plan.groups:
                return plan
        raise UserError(f"freeze={policy} trains nothing (stages: {listed})")
    if stage.lstrip("-").isdigit():
        index = int(stage)
        if not 0 <= index < len(plans):
            raise UserError(f"stage={stage}: freeze={policy} has stages {listed}; give stage=0.."
                            f"{len(plans) - 1} or a stage name")
        plan = plans[index]
    else:
        names = [p.name for p in plans]
        if stage not in names:
            raise UserError(f"stage={stage!r}: freeze={policy} has no such stage"
                            f"{did_you_mean(stage, names)}; its stages: {listed}")
        plan = plans[names.index(stage)]
    if not plan.groups:
        raise UserError(f"stage={stage}: stage {plan.name!r} trains nothing; its stages: {listed}")
    return plan


def _loss_fn(built: BuiltRun) -> LossFn:
    """The loss the run's loop minimises: cross-entropy for a classifier, the mean squared
    reconstruction error for an autoencoder, plus the run's penalty (``trainer.regularize``,
    e.g. L2-SP) where it has one, so the range test sees the objective training will."""
    if built.run.task.name == "autoencoder":
        data_loss = lambda model, x, y: F.mse_loss(model(x).float(), x.float())  # noqa: E731
    else:
        criterion = train_criterion(built)
        data_loss = lambda model, x, y: criterion(model(x), y)  # noqa: E731
    penalty = built.penalty
    if penalty is None:
        return data_loss
    return lambda model, x, y: data_loss(model, x, y) + penalty()


def _warm_up(built: BuiltRun, target: StagePlan, loader) -> torch.optim.Optimizer | None:
    """Train the stages before ``target`` as the run's loop would (their epochs, groups,
    modes, schedules; the whole model, no feature cache); the last optimizer, whose state
    carries into ``target`` as in training. (Only a classifier has stages before another.)"""
    model, run, optimizer = built.model, built.run, None
    criterion = train_criterion(built)
    for plan in built.plans[:target.index]:
        if plan.spec.epochs == 0:
            continue
        apply_stage(model, plan)
        optimizer = stage_optimizer(model, plan, run.optimizer, optimizer)
        schedule = StageSchedule(plan.spec.scheduler or run.scheduler, plan.spec.epochs,
                                 len(loader))
        for epoch in range(plan.first_epoch, plan.last_epoch + 1):
            set_train_mode(model, plan)
            loader.sampler.set_epoch(epoch)
            stats = train_one_epoch(model, loader, criterion, optimizer, built.device,
                                    built.precision, channels_last=built.channels_last,
                                    before_step=schedule.apply, progress=built.progress,
                                    penalty=built.penalty,
                                    desc=f"warm-up epoch {epoch} [{plan.name}]")
            log.info("warm-up epoch %d [%s]: train loss %.4f acc %.4f", epoch, plan.name,
                     stats.loss, stats.acc)
    return optimizer


@dataclass
class StageSetup:
    """A built run at the start of one stage: the model with the stage's requires_grad and
    modes, the stage's optimizer, the training loader and the loss."""

    built: BuiltRun
    plan: StagePlan
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    loss_fn: LossFn

    @property
    def model(self) -> nn.Module:
        return self.built.model


def prepare_stage(run: RunConfig, stage: str | None = None,
                  warmup: bool = False) -> StageSetup:
    """Build ``run`` as training does (seeded first) and set its model up for ``stage`` (an
    index or a name; None: the first stage that trains anything), after training the stages
    before it when ``warmup``."""
    seed_everything(run.seed, run.trainer.deterministic)
    built = build_run(run)
    if built.model is None:
        raise UserError(f"head={run.head.name} is fitted in closed form (no learning rate): "
                        "there is nothing for lr_find to sweep")
    plan = pick_stage(built.plans, stage, run.freeze.name
                      if run.task.name == "classify" else f"(task={run.task.name})")
    model = built.model.to(built.device)
    if built.channels_last:
        model.to(memory_format=torch.channels_last)
    loader, _ = make_loaders(built.splits, run.trainer, run.seed, built.device)
    previous = _warm_up(built, plan, loader) if warmup else None
    apply_stage(model, plan)
    set_train_mode(model, plan)
    optimizer = stage_optimizer(model, plan, run.optimizer, previous)
    loader.sampler.set_epoch(plan.first_epoch)
    return StageSetup(built, plan, optimizer, loader, _loss_fn(built))


def lr_find(run: RunConfig, stage: str | None = None, *, start_lr: float = 1e-7,
            end_lr: float = 10.0, steps: int = 200, smooth: float = 0.05,
            diverge: float = 4.0, rule: str = "steepest", warmup: bool = False) -> LRFindResult:
    """Build ``run`` as training does and run the range test for one stage of its freeze
    policy (see the module's docstring); returns the curve, the suggestion and the build."""
    if rule not in RULES:
        raise UserError(f"rule={rule!r}{did_you_mean(rule, RULES)}; choose one of "
                        f"{', '.join(RULES)}")
    check_settings(start_lr, end_lr, smooth, diverge)  # before anything is built
    setup = prepare_stage(run, stage, warmup)
    built = setup.built
    test = range_test(setup.model, setup.optimizer, setup.loader, setup.loss_fn, built.device,
                      base_lr=run.optimizer.lr, start_lr=start_lr, end_lr=end_lr, steps=steps,
                      smooth=smooth, diverge=diverge, precision=built.precision,
                      channels_last=built.channels_last)
    return LRFindResult(test, suggest(test.lrs, test.smoothed, rule), rule, setup.plan, built)


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


# -- the command ---------------------------------------------------------------------------------
SPEC = Spec(
    prog="transferlab-lr-find",
    summary="A learning-rate range test for one stage of the freeze policy: the run is "
            "composed and built as transferlab-train builds it; the stage's trainable "
            "parameters, BatchNorm modes and optimizer groups are applied; the base LR "
            "(optimizer.lr) grows exponentially from start_lr to end_lr, one training batch a "
            "step, every group keeping its LR multiplier; the sweep stops when the smoothed "
            "loss exceeds diverge x its best. The model and optimizer are restored afterwards. "
            "Writes lr_find.json, lr_find.png and TensorBoard scalars, and prints the "
            "suggested base LR.",
    keys=(
        Key("stage", "the stage to probe: its index or name", metavar="<index|name>",
            default_text="the first stage that trains anything"),
        Key("start_lr", "the first base LR", number, 1e-7),
        Key("end_lr", "the last base LR", number, 10.0),
        Key("steps", "training batches of the sweep (at most)", positive_int, 200),
        Key("smooth", "weight of each new loss in the moving average", number, 0.05),
        Key("diverge", "stop when the smoothed loss exceeds diverge x its best", number, 4.0),
        Key("rule", "how the LR is suggested: steepest = the smoothed loss's steepest descent "
            "(before its minimum), min10 = a tenth of the LR at its minimum", default="steepest",
            choices=RULES),
        Key("warmup", "first train the stages before this one as the policy says (false: the "
            "model as built, as fastai and torch-lr-finder do)", boolean, False),
        Key("apply", "also print the override(s) that set the suggested LR", boolean, False),
        Key("output", "the folder to write into", Path, metavar="<dir>",
            default_text="outputs/lr_find/<date>/<time>_<name>-<stage>"),
    ),
    overrides="a config override, as for transferlab-train: backbone=..., freeze=..., "
              "dataset=..., optimizer=..., trainer.batch_size=... (every other argument)",
    usage="transferlab-lr-find [stage=<index|name>] [start_lr=X] [end_lr=X] [steps=N] ... "
          "[<override> ...]",
    examples=(
        "transferlab-lr-find dataset=hymenoptera freeze=two_stage stage=finetune",
        "transferlab-lr-find freeze=two_stage stage=1 warmup=true apply=true",
        "transferlab-lr-find backbone=resnet18 freeze=discriminative end_lr=1 steps=100",
    ),
)


def run_cli(argv: list[str]) -> int:
    args = parse(SPEC, argv)
    run = load_config(compose_config(args.overrides), args.overrides)
    settings = {k: args[k] for k in ("start_lr", "end_lr", "steps", "smooth", "diverge",
                                     "warmup")}
    result = lr_find(run, args["stage"], rule=args["rule"], **settings)
    out = args["output"] or Path(claim(
        f"outputs/lr_find/{time.strftime('%Y-%m-%d')}/{time.strftime('%H-%M-%S')}_"
        f"{run.name}-{result.stage.name}"))
    try:
        write_outputs(result, out, {**settings, "overrides": args.overrides},
                      f"{run.name}: stage {result.stage.index} {result.stage.name}")
    except OSError as exc:
        raise UserError(f"output={out}: cannot write ({exc.strerror or exc})") from None
    test = result.test
    swept = (f"{len(test.lrs)} steps, {test.lrs[0]:.1e}..{test.lrs[-1]:.1e}, {test.stopped}"
             if test.lrs else f"0 steps, {test.stopped}")
    if result.suggestion is None:
        print(f"lr_find: no suggestion for stage {result.stage.name} ({swept}): the loss did not "
              "fall long enough; try a lower start_lr or more steps")
    else:
        print(f"lr_find: suggested optimizer.lr={result.suggestion:.3g} for stage "
              f"{result.stage.index} {result.stage.name} (rule {result.rule}: "
              f"{RULE_TEXT[result.rule]}; {swept})")
        if args["apply"]:
            print("use: " + "\n  or: ".join(apply_hint(run, result)))
    print(f"Saved to: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-lr-find`` entry point: 0, 2 after one ``error:`` line, 130."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
