"""Hooks: everything around the staged loop's steps and epochs (in the spirit of Lightning's
callbacks, on our declarative stage plans).

A hook overrides the points it needs; :func:`~transferlab.engine.stages.fit_stages` calls each
point on every hook of ``loop.hooks``, in list order. The points, in the order they come:

==================== =========================================================================
``on_fit_start``      before the first stage (a resumed fit too: ``loop.resume`` is set)
``setup_stage``       requires_grad and BatchNorm modes are the stage's; may replace
                      ``loop.inputs`` (the stage's loaders and model) and set ``loop.trained``
``on_stage_start``    the stage's optimizer and schedule exist (with a resume's state);
                      ``loop.fresh``: it starts at its first epoch
``on_step_start``     before each optimizer step (its LR is set; ``loop.step`` counts it)
``on_grad_norm``      the total grad norm before clipping (norm clipping only)
``on_step_end``       after each optimizer step (``loop.last_loss``)
``stop_requested``    asked after each optimizer step and by hooks: True stops the fit there
``on_train_epoch_end`` after the epoch's training pass
``on_interrupt``      the pass stopped part-way (``loop.interrupted``); Interrupted follows
``on_validation_end`` the epoch is evaluated; may add fields to its ``record`` and seconds
``on_epoch_end``      the epoch's record is complete (``loop.record``)
``on_stage_end``      after the stage's last epoch (or its early stop)
``on_fit_end``        after the last stage
==================== =========================================================================

Two more are asked rather than called: ``describe_stage(loop)`` (lines under the stage
table) and ``checkpoint_state(loop)`` (what a checkpoint keeps of the hook, in its ``loop``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from transferlab.config.schema import EarlyStoppingConfig, EmaConfig
from transferlab.engine.early_stopping import EarlyStopping
from transferlab.engine.ema import WeightsEma, ema_fields
from transferlab.engine.epoch import evaluate, reduced

log = logging.getLogger("transferlab")


class Recorder(Protocol):
    """Where hooks write (the run's :class:`~transferlab.run.record.RunTracker`)."""

    extra: dict[str, Any]
    writer: Any  # a TensorBoard SummaryWriter

    def log_text(self, tag: str, text: str, step: int = 0) -> None: ...

    def log_lrs(self, step: int, optimizer: torch.optim.Optimizer) -> None: ...


class Hook:
    """The base hook: every point is a no-op."""

    def on_fit_start(self, loop) -> None: ...

    def setup_stage(self, loop) -> None: ...

    def on_stage_start(self, loop) -> None: ...

    def on_step_start(self, loop) -> None: ...

    def on_grad_norm(self, loop, norm: torch.Tensor) -> None: ...

    def on_step_end(self, loop) -> None: ...

    def stop_requested(self, loop) -> bool:
        return False

    def on_train_epoch_end(self, loop) -> None: ...

    def on_interrupt(self, loop) -> None: ...

    def on_validation_end(self, loop, record: dict) -> None: ...

    def on_epoch_end(self, loop) -> None: ...

    def on_stage_end(self, loop) -> None: ...

    def on_fit_end(self, loop) -> None: ...

    def describe_stage(self, loop) -> str:
        return ""

    def checkpoint_state(self, loop) -> dict[str, Any]:
        return {}


class Ema(Hook):
    """The EMA of the weights (``trainer.ema``, :mod:`transferlab.engine.ema`): made at the fit's
    start (from a resume's state), updated after every optimizer step, its frozen part synced at
    every stage start, evaluated on the stage's val inputs after the model (``val_loss_ema``,
    ``val_acc_ema``). ``loop.ema`` holds it (the checkpoint saves it)."""

    def __init__(self, cfg: EmaConfig):
        self.cfg = cfg

    def on_fit_start(self, loop) -> None:
        loop.ema = WeightsEma.of(self.cfg, loop.model,
                                 loop.resume.ema if loop.resume is not None else None)

    def setup_stage(self, loop) -> None:
        loop.ema.start_stage()

    def on_step_end(self, loop) -> None:
        loop.ema.update()

    def on_validation_end(self, loop, record: dict) -> None:
        with loop.ema.swapped_in():
            stats = reduced(evaluate(loop.inputs.model, loop.inputs.val, loop.eval_objective,
                                     loop.ctx), loop.ctx.world)
        record.update(ema_fields(stats, record))
        loop.seconds += stats.seconds

    @classmethod
    def of(cls, cfg: EmaConfig) -> list[Hook]:
        """The hook, or none when ``trainer.ema.decay`` is null."""
        return [] if cfg.decay is None else [cls(cfg)]


class EarlyStop(Hook):
    """Early stopping per stage (``trainer.early_stopping``, :mod:`.early_stopping`):
    ends a stage (``loop.stop_stage``) when its monitor stops improving; restores the stage's
    best weights at its end; its counters go into every checkpoint."""

    def __init__(self, cfg: EarlyStoppingConfig, recorder: Recorder):
        self.cfg, self.recorder = cfg, recorder
        self.stopping: EarlyStopping | None = None

    def on_fit_start(self, loop) -> None:
        resume = loop.resume
        self.stopping = EarlyStopping(self.cfg, self.recorder,
                                      resume.epoch if resume is not None else None)

    def on_stage_start(self, loop) -> None:
        resume = loop.resume if loop.resuming else None
        self.stopping.begin(loop.plan, resume.early_stopping if resume else None,
                            resume.model if resume and loop.partial is None else None)
        loop.stop_stage = loop.stop_stage or self.stopping.stopped

    def describe_stage(self, loop) -> str:
        return self.stopping.describe()

    def on_epoch_end(self, loop) -> None:
        if self.stopping.update(loop.record, loop.model):
            loop.stop_stage = True

    def checkpoint_state(self, loop) -> dict[str, Any]:
        return self.stopping.state(partial=loop.interrupted is not None)

    def on_stage_end(self, loop) -> None:
        self.stopping.end(loop.model, loop.next_plan)


class LogLearningRates(Hook):
    """Every ``every`` optimizer steps, each group's LR (``lr/<group>``) and, under norm
    clipping, the total grad norm before clipping (``grad/norm``) go to TensorBoard."""

    def __init__(self, recorder: Recorder, every: int):
        self.recorder, self.every = recorder, every

    def on_step_start(self, loop) -> None:
        if loop.step % self.every == 0:
            self.recorder.log_lrs(loop.step, loop.optimizer)

    def on_grad_norm(self, loop, norm: torch.Tensor) -> None:
        if loop.step % self.every == 0:
            self.recorder.writer.add_scalar("grad/norm", float(norm), loop.step)


class Distributed(Hook):
    """DDP (:mod:`transferlab.infra.distributed`): the module a stage trains is wrapped at the
    stage's start, on exactly its trainable parameters, and released at its end; BatchNorm
    statistics that trained are averaged over the processes after every training pass; every
    process must hold the same weights after each stage."""

    def setup_stage(self, loop) -> None:
        loop.trained = loop.ctx.world.wrap(loop.inputs.model, loop.ctx.device)

    def on_train_epoch_end(self, loop) -> None:
        loop.ctx.world.average_batchnorm_stats(loop.model)

    def on_stage_end(self, loop) -> None:
        loop.ctx.world.release(loop.trained)
        loop.ctx.world.check_same_weights(loop.model, f"after stage '{loop.plan.name}'")


class _Nowhere:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class NullRecorder:
    """A recorder that keeps nothing (hooks run for their effect alone, e.g. the LR finder's
    warm-up)."""

    def __init__(self):
        self.extra: dict[str, Any] = {}
        self.writer = _Nowhere()

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def log_lrs(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass
