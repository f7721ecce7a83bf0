"""The hooks of a training run (the engine's generic ones are in
:mod:`transferlab.engine.hooks`): the stage's cached inputs, the record (TensorBoard,
``metrics.json``, the console), the checkpoints, stops on a signal, and an autoencoder's
reconstructions.

:func:`run_hooks` puts a run's hooks in the order they must run in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from transferlab.engine.hooks import Distributed, EarlyStop, Ema, Hook, LogLearningRates
from transferlab.engine.ledger import FreezeLedger
from transferlab.errors import Interrupted, Paused
from transferlab.infra.checkpoint import save_epoch_checkpoints
from transferlab.infra.cluster import preemption_signal
from transferlab.infra.distributed import World
from transferlab.infra.processes import warn_from_signal_handler
from transferlab.infra.runtime import rng_state
from transferlab.run.images import reconstruction_grid
from transferlab.run.record import RunTracker
from transferlab.staging.summary import stage_table

if TYPE_CHECKING:
    from torch import nn

    from transferlab.run.build import BuiltRun

log = logging.getLogger("transferlab")


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step (it then writes a
    checkpoint and raises :class:`Interrupted`); a second Ctrl-C stops at once. Calling it
    says whether a stop was asked for. In a submitit job, its preemption signal too
    (:mod:`transferlab.infra.cluster`): it is the one :class:`Interrupted` carries when both came
    (SLURM may send SIGTERM first), so that the job is requeued."""

    # a stop the fit did not end with Interrupted for: it came after the fit's last look, or
    # the fit failed after it came (take_late)
    late: int | None = None

    def __init__(self):
        self.signum: int | None = None
        self.owner = os.getpid()
        self.preemption = preemption_signal()

    @classmethod
    def take_late(cls) -> int | None:
        """The signal of a stop asked for after the fit's last look at it (the run completed
        anyway) or before the fit failed, once: the sweep that runs the job stops before its
        next one."""
        late, cls.late = cls.late, None
        return late

    def __call__(self) -> bool:
        return self.signum is not None

    def agreed(self, world: World) -> Callable[[], bool]:
        """Asking it says whether any process of the run was asked to stop (then all take
        that signal): DDP processes must stop after the same step. Itself for one process."""
        if not world.active:
            return self

        def ask() -> bool:
            signum = world.max_int(self.signum or 0)
            if signum and self.signum is None:
                self.signum = signum
            return bool(signum)

        return ask

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.owner:  # a loader process forked with this handler: the
            return                      # main process stops it when it stops
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None or self.signum != self.preemption:
            self.signum = signum
        warn_from_signal_handler(log, "%s: finishing the current step, then saving a "
                                 "checkpoint to resume from (Ctrl-C again to stop at once)",
                                 signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers belong to the main thread (e.g. a joblib worker's)
            return
        signals = (signal.SIGINT, signal.SIGTERM, *([self.preemption] if self.preemption else []))
        previous = {s: signal.getsignal(s) for s in signals}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class StopOnRequest(Hook):
    """A stop request (:class:`StopRequest`, agreed over the DDP processes) ends the fit after
    the current optimizer step or, asked again at the epoch's end, after its checkpoint."""

    def __init__(self, stop: StopRequest, world: World):
        self.stop, self.asked = stop, stop.agreed(world)

    def stop_requested(self, loop) -> bool:
        if self.asked():
            loop.stop_signal = self.stop.signum
            return True
        return False

    def on_epoch_end(self, loop) -> None:
        if self.stop_requested(loop):
            raise Interrupted(loop.stop_signal)


class PauseAt(Hook):
    """``trainer.pause_after_epoch``: the fit ends after that epoch of the plan (its checkpoint
    written: this hook comes after :class:`Checkpoint`) with :class:`Paused`, unless the
    epoch is the plan's last."""

    def __init__(self, epoch: int | None):
        self.epoch = epoch

    def on_epoch_end(self, loop) -> None:
        if self.epoch is not None and loop.epoch == self.epoch < loop.total_epochs:
            raise Paused(loop.epoch, loop.total_epochs)


class CachedInputs(Hook):
    """The frozen-prefix feature cache (:mod:`transferlab.feature_cache`): a stage whose input
    end is frozen and deterministic trains on the prefix's stored outputs and the rest of the
    model (``loop.inputs``); every stage's line goes to ``metrics.json["feature_cache"]``."""

    def __init__(self, built, recorder, random_inputs: str | None):
        self.built, self.recorder, self.random_inputs = built, recorder, random_inputs

    def setup_stage(self, loop) -> None:
        built = self.built
        cached = built.feature_cache.stage_inputs(
            loop.plan.name, loop.model, built.backbone, built.image_size, built.splits,
            loop.train_loader, loop.val_loader, self.random_inputs)
        self.recorder.extra["feature_cache"] = {**self.recorder.extra.get("feature_cache", {}),
                                                **built.feature_cache.report}
        if cached is not None:
            loop.inputs = cached


class Record(Hook):
    """The run's record: the stage table at a stage's first start (console and TensorBoard
    ``summary/<stage>``), the parameter counts, and every epoch's record (``loop.improved``: a
    new best)."""

    def __init__(self, tracker: RunTracker, backbone):
        self.tracker, self.backbone = tracker, backbone

    def on_stage_start(self, loop) -> None:
        model, plan = loop.model, loop.plan
        self.tracker.params = {"total": sum(p.numel() for p in model.parameters()),
                               "trainable": sum(p.numel() for p in model.parameters()
                                                if p.requires_grad)}
        if loop.fresh:
            table = stage_table(model, self.backbone, plan)
            table += "".join(hook.describe_stage(loop) for hook in loop.hooks)
            log.info("\n%s", table)
            self.tracker.log_text(f"summary/{plan.name}", table, plan.first_epoch)

    def on_epoch_end(self, loop) -> None:
        loop.improved = self.tracker.log_epoch(loop.record, loop.plan.index)


class ConsoleLine(Hook):
    """The epoch's console line, ``line(record, total_epochs, improved)`` (the task's)."""

    def __init__(self, line: Callable[[dict, int, bool], str]):
        self.line = line

    def on_epoch_end(self, loop) -> None:
        log.info(self.line(loop.record, loop.total_epochs, loop.improved))


class Checkpoint(Hook):
    """``last.pt`` (and ``best.pt``, ``epoch_<N>.pt`` with ``keep_checkpoints=all``) after
    every epoch, and a partial one when a stop ends an epoch part-way: enough to resume
    exactly (:mod:`transferlab.run.resume`). Under DDP every process calls it (their RNG
    states go in); rank 0 writes. The weights still equal to the pretrained ones are left out
    (``built.source``, ``trainer.checkpoint_weights=changed``)."""

    def __init__(self, built, tracker: RunTracker, run_dir: Path):
        self.built, self.tracker, self.run_dir = built, tracker, run_dir

    def on_epoch_end(self, loop) -> None:
        self._save(loop, loop.epoch, loop.improved, {})

    def on_interrupt(self, loop) -> None:
        self._save(loop, loop.epoch - 1, False, {"partial": loop.interrupted})

    def _save(self, loop, epoch: int, improved: bool, extra: dict) -> None:
        built, world = self.built, loop.ctx.world
        state = {"step": loop.step, "schedule_step": loop.schedule.step, **extra}
        for hook in loop.hooks:
            state.update(hook.checkpoint_state(loop))
        rngs = world.gather(rng_state())
        if not world.main:
            return
        state["data"] = built.data_fingerprint()
        if world.active:
            state.update(world_size=world.size, rng_ranks=rngs[1:])
        if built.penalty is not None:
            state["l2sp_w0"] = built.penalty.fingerprint()
        partial = "partial" in state
        ema_best = not partial and (self.tracker.extra.get("best_ema") or {}).get("epoch") == epoch
        save_epoch_checkpoints(
            self.run_dir, improved, improved_ema=ema_best,
            keep_every=built.run.trainer.keep_checkpoints == "all" and not partial,
            ema=loop.ema.state() if loop.ema is not None else None, model=built.model,
            optimizer=loop.optimizer, epoch=epoch, stage_index=loop.plan.index,
            stage_name=loop.plan.name, config=built.run.as_dict(), history=self.tracker.history,
            best=self.tracker.best, classes=built.splits.classes if built.task.has_classes
            else [], loop=state, source=built.source)


class RecordPredictions(Hook):
    """After the last stage, the per-image predictions of the run's best weights on its val
    (and test) split: ``predictions_<split>.npz`` (:mod:`transferlab.run.predictions`), and the
    grid of val's misclassified images, ``mistakes.png`` (:mod:`transferlab.run.mistakes`). The
    best epoch's weights of the current stage are kept (rank 0, without DDP) so that they
    are scored on the stage's own val inputs."""

    def __init__(self, built: BuiltRun, tracker: RunTracker,
                 also: tuple[Callable[[nn.Module], None], ...] = ()):
        from transferlab.run.predictions import BestWeights

        self.built, self.tracker, self.kept = built, tracker, BestWeights()
        self.also = also  # more users of the best weights' model (dataset.extra_test's sets)

    def on_epoch_end(self, loop) -> None:
        world = self.built.world
        if loop.improved and world.main and not world.active:
            self.kept.keep(loop)

    def on_fit_end(self, loop) -> None:
        from transferlab.run.mistakes import record_mistakes
        from transferlab.run.predictions import record_run_predictions

        def with_best(model) -> None:
            record_mistakes(self.built, model, self.tracker)
            for use in self.also:
                use(model)

        record_run_predictions(self.built, loop, self.tracker, self.kept, with_best=with_best)


class ReconstructionImages(Hook):
    """After every epoch, the first ``shown`` val images above their reconstructions
    (``recon/val`` in TensorBoard)."""

    def __init__(self, built: BuiltRun, tracker: RunTracker, shown: int):
        self.built, self.tracker = built, tracker
        self.shown = min(shown, len(built.splits.val))
        self.samples = (torch.stack([built.splits.val[i][0] for i in range(self.shown)])
                        if self.shown and tracker.writes else None)

    def on_epoch_end(self, loop) -> None:
        if self.samples is not None:
            spec = self.built.backbone.input
            grid = reconstruction_grid(loop.model, self.samples, spec.mean, spec.std,
                                       loop.ctx.device)
            self.tracker.log_images("recon/val", grid, loop.epoch, nrow=self.shown)


def run_hooks(built, tracker: RunTracker, run_dir: Path, stop: StopRequest) -> list[Hook]:
    """A training run's hooks, in the order each point must call them: the EMA first (its
    frozen part synced before the stage's inputs are computed), the task's input hooks (the
    feature cache), the DDP wrapper, early stopping, LR logging, the freeze ledger, the
    record, the task's own hooks, the console line, the checkpoint, and stop requests last
    (after the checkpoint), then the pause point."""
    trainer, task = built.run.trainer, built.task
    return [*Ema.of(trainer.ema), *task.input_hooks(built, tracker), Distributed(),
            EarlyStop(trainer.early_stopping, tracker),
            LogLearningRates(tracker, trainer.log_every_n_steps), FreezeLedger(tracker),
            Record(tracker, built.backbone), *task.hooks(built, tracker),
            ConsoleLine(task.log_line), Checkpoint(built, tracker, run_dir),
            StopOnRequest(stop, built.world), PauseAt(trainer.pause_after_epoch)]
