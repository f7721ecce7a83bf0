"""One run, end to end: config -> build (:mod:`.build`) -> the task's loop (:mod:`.tasks`) ->
records and artifacts (``metrics.json``, TensorBoard, checkpoints, learning curves).

:func:`train` is the plain function behind ``transferlab-train``: it takes a composed config
(or a :class:`~transferlab.config.RunConfig`) and returns the metrics and what it built, so
tests and notebooks can call it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from transferlab.backbone_init import format_report, report_summary
from transferlab.config import RunConfig, load_config
from transferlab.errors import error_line
from transferlab.run.build import BuiltRun, build_run
from transferlab.runtime import seed_everything
from transferlab.tracking import RunTracker

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


def write_failed_metrics(run_dir: Path, exc: BaseException) -> None:
    """A ``metrics.json`` for a run that stopped before its record opened: ``failed`` with the
    error's first line, or ``interrupted``."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    data = {"status": "interrupted" if interrupted else "failed",
            "error": "KeyboardInterrupt" if interrupted else error_line(exc), "history": [],
            "best": None, "final": None, "params": {}, "wall_seconds": 0.0}
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, run_dir / "metrics.json")


def _record_build(tracker: RunTracker, built: BuiltRun) -> None:
    """What every run records of its build: restored weights and the data."""
    if built.init_report is not None:
        tracker.log_text("init/restore", format_report(built.init_report))
        tracker.extra["init"] = report_summary(built.init_report)
    splits = built.splits
    tracker.extra["data"] = {"train": len(splits.train), "val": len(splits.val),
                             "test": len(splits.test) if splits.test is not None else 0,
                             "classes": splits.classes, "train_per_class": splits.class_counts()}
    if splits.skipped:
        tracker.extra["skipped_files"] = splits.skipped


def train(cfg: DictConfig | RunConfig, run_dir: str | Path,
          overrides: list[str] | None = None) -> RunResult:
    """Train one composed config; write every artifact under ``run_dir``.

    However it ends, ``metrics.json`` says so: ``completed``, or ``failed`` (with the error's
    first line) / ``interrupted`` at whatever step it stopped, config and build included."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = cfg if isinstance(cfg, RunConfig) else load_config(cfg, overrides or [])
        seed_everything(run.seed, run.trainer.deterministic)
        built = build_run(run)
        task, splits = built.task, built.splits
        log.info("run %s: task %s, %s on %s (%d train / %d val images, %d classes, %dpx) on "
                 "%s, precision %s", run.name, run.task.name, built.backbone.name,
                 run.dataset.name, len(splits.train), len(splits.val), splits.num_classes,
                 built.image_size, built.device, built.precision.label)
        tracker = RunTracker(run_dir, run.as_dict(),
                             run_hparams(run, overrides, built.total_epochs, task.unused_groups),
                             loss_tag=task.loss_tag)
    except BaseException as exc:
        write_failed_metrics(run_dir, exc)
        raise
    with tracker.recording(task.curves_title(run)):
        _record_build(tracker, built)
        task.fit(built, tracker, run_dir)
    log.info(task.summary(tracker.metrics, run_dir))
    return RunResult(run_dir, tracker.metrics, built)
