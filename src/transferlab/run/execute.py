"""A run from its config to its record: :func:`train` (build, open the record, run the task's
loop) and :func:`resume_run` (the same from a checkpoint). However a run ends, its
``metrics.json`` says so.

Under ``torchrun`` (or in any process group: :mod:`transferlab.infra.distributed`) every process
calls the same function with the same config and run directory; rank 0 alone writes in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from transferlab.backbones.init import format_report, report_summary
from transferlab.backbones.source import plain_state
from transferlab.config import RunConfig, load_config
from transferlab.config.validate import is_session_override
from transferlab.data import derived_seed
from transferlab.errors import Interrupted, Paused, UserError
from transferlab.infra.distributed import World, init_from_env
from transferlab.infra.run_dirs import config_of_run, lock_run, write_failed_metrics
from transferlab.infra.runtime import seed_everything
from transferlab.registry import TASKS
from transferlab.run.build import BuiltRun, build_run
from transferlab.run.record import RunTracker

if TYPE_CHECKING:
    from transferlab.run.resume import ResumePoint

log = logging.getLogger("transferlab")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    built: BuiltRun | None = None

    @property
    def best_val_acc(self) -> float:
        return (self.metrics.get("best") or {}).get("val_acc", 0.0)


def run_hparams(run: RunConfig, overrides: list[str] | None, epochs: int,
                leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The HParams record: each config group's chosen option, the seed, every override."""
    hp: dict[str, Any] = {
        "task": run.task.name, "backbone": run.backbone.name, "head": run.head.name,
        "dataset": run.dataset.name, "augment": run.augment.name, "freeze": run.freeze.name,
        "optimizer": run.optimizer.name, "scheduler": run.scheduler.name, "seed": run.seed,
        "optimizer.lr": run.optimizer.lr, "epochs": epochs,
        "backbone.pretrained": run.backbone.pretrained,
    }
    for key in leave_out:
        hp.pop(key, None)
    for item in overrides or []:
        key, _, value = item.lstrip("+~").partition("=")
        if is_session_override(item):
            continue
        if key and ("." in key or key not in hp) and key.split(".")[0] not in leave_out:
            hp[key] = _scalar(value)
    return hp


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _record_build(tracker: RunTracker, built: BuiltRun) -> None:
    """What every run records of its build: restored weights, LoRA adapters and the data."""
    if built.init_report is not None:
        tracker.log_text("init/restore", format_report(built.init_report))
        tracker.extra["init"] = report_summary(built.init_report)
    adapters = getattr(built.model, "adapters", None)
    if adapters is not None:
        tracker.log_text("lora/adapters", adapters.describe())
        tracker.extra["lora"] = adapters.record()
    splits = built.splits
    tracker.extra["data"] = {"train": len(splits.train), "val": len(splits.val),
                             "test": len(splits.test) if splits.test is not None else 0,
                             "classes": splits.classes, "train_per_class": splits.class_counts()}
    if splits.folds is not None:
        tracker.extra["folds"] = splits.folds
    if splits.skipped:
        tracker.extra["skipped_files"] = splits.skipped


def train(cfg: DictConfig | RunConfig, run_dir: str | Path,
          overrides: list[str] | None = None) -> RunResult:
    """Train one composed config; write every artifact under ``run_dir``.

    However it ends, ``metrics.json`` says so: ``completed``, or ``failed`` (with the error's
    first line) / ``interrupted`` (with the command that resumes it) at whatever step it
    stopped, config and build included."""
    run_dir = Path(run_dir)
    run = cfg if isinstance(cfg, RunConfig) else config_of_run(cfg, overrides, run_dir)
    world = init_from_env()
    with lock_run(run_dir, world):  # no other process writes the run while it trains
        return _execute(run, run_dir, overrides, None, world)


def resume_run(run_dir: str | Path, overrides: list[str] | None = None, *,
               requeued: bool = False) -> RunResult:
    """Go on with the run in ``run_dir`` from its ``checkpoints/last.pt`` (see
    :mod:`transferlab.run.resume`). ``overrides``: only those that cannot change the result
    (``trainer.progress``, ``trainer.num_workers``) or extend the last stage
    (``trainer.epochs``, ``freeze.finetune_epochs``). ``requeued``: the run's own submitit job
    started again, so a ``running`` record is not another process's run (see
    :func:`~transferlab.run.resume.requeued_action`). The run is locked while it goes on
    (:func:`~transferlab.infra.run_dirs.lock_run`): a second resume of it is refused."""
    from transferlab.run.resume import check_is_run

    world = init_from_env()
    run_dir = Path(run_dir)
    check_is_run(run_dir)  # (before its lock file is made)
    with lock_run(run_dir, world):  # one process goes on with a run: a second is refused
        return _resume(run_dir, overrides, requeued, world)


def _resume(run_dir: Path, overrides: list[str] | None, requeued: bool,
            world: World) -> RunResult:
    """:func:`resume_run` once the run is locked: its state checked, then trained on."""
    from transferlab.run.resume import (
        ResumePoint,
        overrides_extend,
        read_status,
        resume_checkpoint,
        resumed_config,
        still_running,
    )

    status = read_status(run_dir) if world.main else {}
    # DDP: rank 0's reading, which its own record cannot race with
    status, running = world.broadcast((status, world.main and still_running(status)))
    if running and not requeued:
        raise UserError(f"resume={run_dir}: the run is still going (pid {status['pid']} on "
                        "this host)")
    ckpt = resume_checkpoint(run_dir, status)
    point = ResumePoint.from_checkpoint(ckpt)
    run = load_config(resumed_config(ckpt["config"], list(overrides or []), point.epoch))
    if status.get("status") == "completed" and not overrides_extend(overrides or []):
        key = TASKS.builder(run.task.name).extend_key(ckpt["config"])
        more = (f"give its last stage more with {key}=N" if key else
                "its stages cannot be extended; start a new run")
        raise UserError(f"resume={run_dir}: the run is completed ({point.epoch} epochs): nothing "
                        f"to resume; {more}")
    log.info("resuming %s from epoch %d%s", run_dir, point.epoch,
             f" (+{point.partial['steps']} steps of epoch {point.partial['epoch']})"
             if point.partial else "")
    return _execute(run, run_dir, overrides, point, world)


def _execute(run: RunConfig, run_dir: Path, overrides: list[str] | None,
             resume: ResumePoint | None, world: World) -> RunResult:
    """Build, open the record, run the task's loop: the part every run and resume share."""
    from transferlab.run.resume import check_data

    try:
        seed_everything(run.seed, run.trainer.deterministic)
        built = build_run(run, world)
        if resume is not None:
            check_data(resume.data, built.data_fingerprint(), run_dir)
            resume.check_world(world.size)
            resume.put_back(plain_state(built.backbone.module),
                            f"resume={run_dir}: checkpoints/last.pt")
            built.resume = resume
        if world.rank > 0:  # the weights are built (alike): dropout draws differ per process
            seed_everything(derived_seed("rank", run.seed, world.rank), run.trainer.deterministic)
        task, splits = built.task, built.splits
        log.info("run %s: task %s, %s on %s (%d train / %d val images, %d classes, %dpx) on "
                 "%s%s, precision %s", run.name, run.task.name, built.backbone.name,
                 run.dataset.name, len(splits.train), len(splits.val), splits.num_classes,
                 built.image_size, built.device,
                 f" x {world.size} processes ({world.backend(built.device)})"
                 if world.active else "", built.precision.label)
        hparams = run_hparams(run, overrides, built.total_epochs, task.unused_groups)
        if world.active:
            hparams["world_size"] = world.size
        tracker = RunTracker(run_dir, run.as_dict(), hparams, loss_tag=task.loss_tag,
                             resume=resume.record() if resume is not None else None,
                             writes=world.main)
        if world.active:
            tracker.extra["distributed"] = world.record(built.device, run.trainer)
    except BaseException as exc:
        if resume is None and world.main:  # a resume that cannot start leaves the record
            write_failed_metrics(run_dir, exc)
        raise
    try:
        with tracker.recording(task.curves_title(run)):
            if resume is None:
                _record_build(tracker, built)
            task.fit(built, tracker, run_dir)
    except (Interrupted, KeyboardInterrupt) as stop:
        stop.run_dir = run_dir  # for the message that says how to go on
        raise
    except Paused as pause:
        log.info("paused after epoch %d of %d: go on with %s", pause.epoch, pause.total,
                 tracker.metrics.get("resume_command"))
        world.barrier()
        return RunResult(run_dir, tracker.metrics, built)
    log.info(task.summary(tracker.metrics, run_dir))
    world.barrier()  # DDP: every process returns once rank 0's record is complete
    return RunResult(run_dir, tracker.metrics, built)
