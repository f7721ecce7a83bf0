"""The one staged loop: :func:`fit_stages` runs a freeze policy's stage plans, epoch by epoch.

What the loop itself does, and nothing more::

    for each stage (from the resume point on):
        requires_grad and BatchNorm modes of the plan      (policy.apply_stage / set_train_mode)
        setup_stage hooks                                   (EMA, feature cache, DDP wrap)
        the stage's optimizer and LR schedule               (+ their state on a resume)
        on_stage_start hooks                                (early stopping, ledger, tables)
        for each epoch:
            train_epoch   (step hooks: LR schedule, LR log, EMA update, stop requests)
            on_train_epoch_end hooks                        (DDP: BatchNorm statistics)
            stopped part-way? on_interrupt hooks (checkpoint), raise Interrupted
            evaluate, the epoch's record
            on_validation_end hooks                         (EMA: its own evaluation)
            on_epoch_end hooks                              (early stopping, record, checkpoint,
                                                             stop requests)
        on_stage_end hooks                                  (DDP release, best weights, ledger)

Everything else is a :class:`~transferlab.engine.hooks.Hook`, called in the order of
``loop.hooks``. The training run (:mod:`transferlab.run.tasks`) and the LR finder's warm-up
(:mod:`transferlab.tools.lr_find`) both run on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transferlab.config.schema import OptimizerConfig, SchedulerConfig
from transferlab.data import epoch_order
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import EpochStats, Objective, evaluate, reduced, train_epoch
from transferlab.engine.stepping import StepHooks, StepOptions
from transferlab.errors import Interrupted, UserError
from transferlab.feature_cache import StageInputs
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import StagePlan, apply_stage, set_train_mode
from transferlab.staging.schedule import StageSchedule

RecordFn = Callable[[int, StagePlan, EpochStats, EpochStats], dict]


def plain_record(epoch: int, plan: StagePlan, tr: EpochStats, va: EpochStats) -> dict:
    """An epoch's record: its number, stage, train and val loss and accuracy (and the mean
    penalty, where the run has one)."""
    return {"epoch": epoch, "stage": plan.name, "train_loss": tr.loss, "train_acc": tr.acc,
            **({"train_penalty": tr.penalty} if tr.penalty is not None else {}),
            "val_loss": va.loss, "val_acc": va.acc}


@dataclass(eq=False)
class Loop(StepHooks):
    """A staged fit: what it is given (the model, its stage plans, the loaders, the
    objectives, the hooks) and where it stands (the stage, its inputs and optimizer, the epoch,
    the global step). Hooks read it and may change the fields their docs name."""

    model: nn.Module  # the whole model (a cached stage trains a part that shares its weights)
    plans: list[StagePlan]
    ctx: EpochContext
    train_loader: Any
    val_loader: Any
    optimizer_cfg: OptimizerConfig
    scheduler_cfg: SchedulerConfig
    train_objective: Objective
    eval_objective: Objective
    hooks: list = field(default_factory=list)
    stepping: StepOptions = field(default_factory=StepOptions)
    record_fn: RecordFn = plain_record
    penalty: Callable[[], torch.Tensor] | None = None
    resume: Any = None  # a ResumePoint (transferlab.run.resume) to go on from, or None
    # -- where it stands -------------------------------------------------------------------
    plan: StagePlan | None = None
    next_plan: StagePlan | None = None
    inputs: StageInputs | None = None  # setup_stage hooks may replace them (feature cache)
    trained: nn.Module | None = None  # what the stage trains (setup_stage: a DDP wrapper)
    optimizer: torch.optim.Optimizer | None = None
    schedule: StageSchedule | None = None
    resuming: bool = False  # this stage goes on from ``resume``
    fresh: bool = False  # this stage starts at its first epoch (not part-way on a resume)
    partial: dict | None = None  # the rest of an epoch a resume goes on with
    interrupted: dict | None = None  # on_interrupt: how far the stopped epoch got
    epoch: int = 0
    step: int = 0  # optimizer steps of the whole fit
    last_loss: float = 0.0  # the last optimizer step's mean objective
    seconds: float = 0.0  # the epoch's seconds so far (on_validation_end hooks add theirs)
    record: dict | None = None  # the epoch's record (on_epoch_end)
    stop_stage: bool = False  # a hook ends the stage after this epoch (early stopping)
    stop_signal: int | None = None  # a hook asks the whole fit to stop (the signal's number)
    improved: bool = False  # the epoch is the run's best so far (set by the record's hook)
    ema: Any = None  # the EMA of the weights (set by its hook)

    @property
    def total_epochs(self) -> int:
        return self.plans[-1].last_epoch if self.plans else 0

    def call(self, point: str, *args) -> None:
        """Every hook's ``point``, in order."""
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    # -- StepHooks: what train_epoch calls around each optimizer step -------------------------
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.schedule.apply(optimizer)
        self.step += 1
        self.call("on_step_start")

    def on_grad_norm(self, norm: torch.Tensor) -> None:
        self.call("on_grad_norm", norm)

    def after_step(self, loss: float) -> None:
        self.last_loss = loss
        self.call("on_step_end")

    def should_stop(self) -> bool:
        return any([hook.stop_requested(self) for hook in self.hooks])  # every hook is asked


def fit_stages(loop: Loop) -> Loop:
    """Train every stage of ``loop.plans`` with epochs, from the start or from
    ``loop.resume``; hooks do everything around the steps and epochs."""
    resume = loop.resume
    if resume is not None:
        loop.step, loop.partial = resume.step, resume.partial
    loop.call("on_fit_start")
    plans = [p for p in loop.plans if p.spec.epochs > 0]
    for plan, next_plan in zip(plans, [*plans[1:], None], strict=True):
        if resume is not None and plan.index < resume.stage_index:
            continue
        first = _start_stage(loop, plan, next_plan)
        for epoch in range(first, plan.last_epoch + 1):
            if loop.stop_stage:
                break
            _run_epoch(loop, epoch)
        loop.call("on_stage_end")
    loop.call("on_fit_end")
    return loop


def _start_stage(loop: Loop, plan: StagePlan, next_plan: StagePlan | None) -> int:
    """Set the stage up (requires_grad, modes, inputs, optimizer, schedule); its first epoch."""
    apply_stage(loop.model, plan)
    set_train_mode(loop.model, plan)
    resume = loop.resume
    loop.plan, loop.next_plan, loop.stop_stage = plan, next_plan, False
    loop.resuming = resume is not None and plan.index == resume.stage_index
    loop.inputs = StageInputs(loop.train_loader, loop.val_loader, loop.model)
    loop.trained = None
    loop.call("setup_stage")
    if loop.trained is None:
        loop.trained = loop.inputs.model
    loop.optimizer = stage_optimizer(loop.model, plan, loop.optimizer_cfg,
                                     None if loop.resuming else loop.optimizer)
    loop.schedule = StageSchedule(plan.spec.scheduler or loop.scheduler_cfg, plan.spec.epochs,
                                  loop.stepping.steps_per_epoch(len(loop.inputs.train)))
    first = plan.first_epoch
    if loop.resuming:
        loop.optimizer.load_state_dict(resume.optimizer)
        loop.schedule.step = resume.schedule_step
        first = loop.partial["epoch"] if loop.partial else resume.epoch + 1
    loop.fresh = first == plan.first_epoch and loop.partial is None
    loop.call("on_stage_start")
    return first


def _resumed_part(loop: Loop) -> EpochStats | None:
    """The part of the epoch done before a stop a resume goes on from (its loader then skips
    those batches); None for a whole epoch."""
    partial, loop.partial = loop.partial, None
    if partial is None:
        return None
    epoch_order(loop.train_loader).skip_batches = partial["steps"]
    sums = tuple(partial["sums"]) if loop.ctx.world.main else (0.0, 0, 0)  # all ranks' sums
    return EpochStats(0.0, 0.0, 0, partial["seconds"], partial["steps"], sums=sums)


def _run_epoch(loop: Loop, epoch: int) -> None:
    plan, inputs, world = loop.plan, loop.inputs, loop.ctx.world
    sampler = epoch_order(loop.train_loader)
    set_train_mode(loop.model, plan)
    done = _resumed_part(loop)
    if sampler is not None:  # a run's ResumableSampler or its stream: the order of (seed, epoch)
        sampler.set_epoch(epoch)
    loop.epoch = epoch
    try:
        tr = train_epoch(loop.trained, inputs.train, loop.train_objective, loop.optimizer,
                         loop.ctx, hooks=loop, stepping=loop.stepping, resume=done,
                         penalty=loop.penalty,
                         desc=f"epoch {epoch}/{loop.total_epochs} [{plan.name}]")
    except FloatingPointError as exc:  # "loss is nan at step S"
        raise UserError(f"{exc}".replace(" at step", f" at epoch {epoch} step")
                        + ": the run diverged; lower optimizer.lr") from None
    if done is not None:
        sampler.skip_batches = 0
    loop.call("on_train_epoch_end")
    if tr.stopped and tr.steps < len(inputs.train):
        loop.interrupted = {"epoch": epoch, "steps": tr.steps,
                            "sums": list(reduced(tr, world).sums), "seconds": tr.seconds}
        loop.call("on_interrupt")
        raise Interrupted(loop.stop_signal)
    tr = reduced(tr, world)
    va = reduced(evaluate(inputs.model, inputs.val, loop.eval_objective, loop.ctx), world)
    loop.seconds = tr.seconds + va.seconds
    record = loop.record_fn(epoch, plan, tr, va)
    loop.call("on_validation_end", record)
    record.update(lr={g["name"]: g["lr"] for g in loop.optimizer.param_groups},
                  seconds=round(loop.seconds, 3))
    loop.record = record
    loop.call("on_epoch_end")
