"""Run records: TensorBoard events and ``metrics.json`` (the contract other tools read)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from torch.utils.tensorboard.summary import hparams as hparams_summary

from transferlab.engine.best import epoch_rank
from transferlab.engine.ema import best_ema
from transferlab.errors import Interrupted, Paused, error_line, stops_unwrapped
from transferlab.infra.liveness import process_started
from transferlab.infra.processes import resume_command
from transferlab.infra.run_dirs import atomic_write_text, lock_run
from transferlab.infra.runtime import runtime_changes, runtime_record
from transferlab.run.trackers import open_trackers

log = logging.getLogger("transferlab")

HPARAM_METRICS = ("best_val_acc", "best_val_loss", "final_val_acc", "final_val_loss")
STEP_TAGS = ("lr/", "grad/")  # TensorBoard tags per optimizer step (the others: per epoch)
RECORD_KEYS = ("status", "history", "best", "final", "params", "wall_seconds")


def trim_events(tb_dir: Path, epoch: int, step: int) -> int:
    """Drop the TensorBoard points written after a checkpoint, so that a resumed run continues
    the same event stream without duplicates: per-step tags (``lr/...``, ``grad/...``) after
    ``step``, the others (per epoch) after ``epoch``. Every event file of ``tb_dir`` is
    rewritten into one; returns the number of points dropped."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    if not files:
        return 0
    kept, dropped = [], 0
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("file_version"):
                continue
            if event.HasField("summary"):
                values = [v for v in event.summary.value
                          if event.step <= (step if v.tag.startswith(STEP_TAGS) else epoch)]
                dropped += len(event.summary.value) - len(values)
                if not values:
                    continue
                del event.summary.value[:]
                event.summary.value.extend(values)
            kept.append(event)
    _rewrite_events(tb_dir, files, kept, ".resumed")
    return dropped


def _rewrite_events(tb_dir: Path, files: list[Path], events: list, suffix: str,
                    summaries=()) -> None:
    """Replace the event ``files`` of ``tb_dir`` by one file: ``summaries`` first, then
    ``events`` (each with its own step and time)."""
    from torch.utils.tensorboard.writer import FileWriter

    writer = FileWriter(str(tb_dir), filename_suffix=suffix)
    for summary in summaries:
        writer.add_summary(summary)
    for event in events:
        writer.add_event(event, event.step, event.wall_time)
    writer.close()
    for path in files:
        path.unlink()


HPARAMS_TAGS = ("_hparams_/experiment", "_hparams_/session_start_info")


def add_hparams(run_dir: Path, extra: dict[str, Any]) -> None:
    """Add ``extra`` to the HParams of a run that has ended (a halving sweep's rung): in its
    ``metrics.json`` and in its TensorBoard session, whose start record is rewritten (the
    HParams dashboard reads a run's first one). The run's lock is held meanwhile."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    with lock_run(run_dir):
        record = _read_json(run_dir / "metrics.json")
        if not record:
            return
        hparams = {**record.get("hparams", {}), **{k: _hparam_value(v) for k, v in extra.items()}}
        record["hparams"] = hparams
        atomic_write_text(run_dir / "metrics.json", json.dumps(finite(record), indent=2,
                                                               allow_nan=False))
        files = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
        if not files:  # no TensorBoard session (trainer.loggers without tensorboard)
            return
        kept = []
        for path in files:
            for raw in RawEventFileLoader(str(path)).Load():  # (as written: no migration)
                event = Event.FromString(raw)
                if event.HasField("file_version") or (event.HasField("summary") and any(
                        v.tag in HPARAMS_TAGS for v in event.summary.value)):
                    continue
                kept.append(event)
        metrics = dict.fromkeys((f"hparam/{m}" for m in HPARAM_METRICS), 0.0)
        _rewrite_events(run_dir / "tb", files, kept, ".hparams",
                        hparams_summary(hparams, metrics)[:2])  # (its end record is kept)


def _hparam_value(value: Any) -> int | float | str | bool:
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value) if value is not None else "null"


class _Silent:
    """A SummaryWriter that writes nothing: the record of a DDP process other than rank 0."""

    def __getattr__(self, name: str):
        return self if name == "file_writer" else _nothing


def _nothing(*args, **kwargs) -> None:
    return None


class RunTracker:
    """Writes one run's TensorBoard events (``tb/``) and ``metrics.json``.

    ``metrics.json`` is rewritten after every epoch, so readers see a run's progress while it
    is still going (status ``running``).

    ``writes=False`` (a DDP process other than rank 0): the same record is kept in memory
    (history, best, extra), so every process takes the same decisions, but nothing is written.
    """

    def __init__(self, run_dir: Path, config: dict, hparams: dict[str, Any],
                 loss_tag: str = "loss", resume: dict[str, Any] | None = None,
                 writes: bool = True):
        """``resume``: the checkpoint a resumed run goes on from (its ``epoch``, ``step``,
        ``history`` and ``best``): the record continues where that checkpoint left it."""
        self.run_dir, self.writes = run_dir, writes
        self.loss_tag = loss_tag  # TensorBoard: <split>/<loss_tag> (the autoencoder: recon_loss)
        self.metrics_path = run_dir / "metrics.json"
        self.started = time.perf_counter()
        self.hparams = {k: _hparam_value(v) for k, v in hparams.items()}
        self.params: dict[str, int] = {}
        self.wall_before = 0.0  # seconds of the sessions before a resume
        # where and when it ran (sweeps launched in parallel show their worker processes)
        here = {"host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": process_started(os.getpid()), "runtime": runtime_record()}
        # trainer.loggers (run.trackers): TensorBoard's writer is self.writer
        self.trackers = open_trackers(run_dir, config, resume is not None) if writes else []
        if resume is None:
            self.history: list[dict] = []
            self.best: dict | None = None
            self.extra: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                          **here, "hparams": self.hparams}
            self.writer = self._events()
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "```yaml\n" + text + "\n```", 0)
            for tracker in self.trackers:
                tracker.log_text("config", text, 0)
            for summary in hparams_summary(self.hparams, dict.fromkeys(
                    (f"hparam/{m}" for m in HPARAM_METRICS), 0.0)):
                self.writer.file_writer.add_summary(summary)
        else:
            self.history = list(resume["history"])
            self.best = resume["best"]
            previous = _read_json(self.metrics_path)
            self.extra = {k: v for k, v in previous.items() if k not in RECORD_KEYS}
            for key in ("error", "resume_command", "paused"):
                self.extra.pop(key, None)
            changed = runtime_changes(self.extra.get("runtime"), here["runtime"])
            if changed and writes:
                log.warning("resuming with another runtime (%s): the epochs from here are not "
                            "bit-identical to an uninterrupted run's (OMP_NUM_THREADS sets the "
                            "threads)", ", ".join(changed))
            self.extra.update(here)
            if "best_ema" in self.extra:  # as of the checkpoint, not of a later epoch
                self.extra["best_ema"] = best_ema(self.history)
            self.params = previous.get("params") or {}
            self.wall_before = float(previous.get("wall_seconds") or 0.0)
            self.extra["resumes"] = [*self.extra.get("resumes", []), {
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_epoch": resume["epoch"],
                "from_step": resume["step"], "mid_epoch": resume.get("partial") is not None,
                **({"runtime_changed": changed} if changed else {})}]
            if writes:
                trim_events(run_dir / "tb", resume["epoch"], resume["step"])
            self.writer = self._events()
        self._write("running")

    def _events(self):
        """The TensorBoard writer of ``tb/`` (trainer.loggers has tensorboard), else one that
        writes nothing."""
        writers = [w for t in self.trackers if (w := t.summary_writer()) is not None]
        return writers[0] if writers else _Silent()

    # -- per step / per epoch -------------------------------------------------------------
    def log_lrs(self, step: int, optimizer) -> None:
        seen = set()
        for group in optimizer.param_groups:
            name = group.get("name", "all")
            if name not in seen:
                seen.add(name)
                self.writer.add_scalar(f"lr/{name}", group["lr"], step)

    def log_images(self, tag: str, images, step: int = 0, nrow: int | None = None) -> None:
        """A grid of (N, 3, H, W) images with values in [0, 1], ``nrow`` (default 8) a row."""
        from torchvision.utils import make_grid

        nrow = nrow or min(8, len(images))
        self.writer.add_image(tag, make_grid(images, nrow=nrow, padding=2), step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # Markdown renders leading spaces away: keep the table in a code block.
        self.writer.add_text(tag, "```\n" + text + "\n```", step)
        for tracker in self.trackers:
            tracker.log_text(tag, text, step)

    def log_epoch(self, record: dict, stage_index: int) -> bool:
        """Record one epoch; returns True when it is the best so far (val acc, then val loss;
        val loss alone for records without accuracy, e.g. the autoencoder's). ``best`` is
        the raw weights' best; with an EMA of the weights, ``best_ema`` is the EMA's."""
        epoch = record["epoch"]
        self.history.append(record)
        for split in ("train", "val"):
            self.writer.add_scalar(f"{split}/{self.loss_tag}", record[f"{split}_loss"], epoch)
            if record.get(f"{split}_acc") is not None:
                self.writer.add_scalar(f"{split}/acc", record[f"{split}_acc"], epoch)
        if "train_penalty" in record:  # trainer.regularize's term, outside train/loss
            self.writer.add_scalar("train/penalty", record["train_penalty"], epoch)
        if "val_loss_ema" in record:  # the EMA of the weights (trainer.ema)
            self.writer.add_scalar(f"val/{self.loss_tag}_ema", record["val_loss_ema"], epoch)
            if record.get("val_acc_ema") is not None:
                self.writer.add_scalar("val/acc_ema", record["val_acc_ema"], epoch)
            self.extra["best_ema"] = best_ema(self.history)
        self.writer.add_scalar("stage", stage_index, epoch)
        improved = self.best is None or epoch_rank(record) > epoch_rank(self.best)
        if improved:
            self.best = _summary(record)
        summary = self.summary_metrics()
        for name in HPARAM_METRICS:
            self.writer.add_scalar(f"hparam/{name}", summary[name], epoch)
        self.writer.flush()
        for tracker in self.trackers:
            tracker.log_epoch(record, self.history)
        self._write("running")
        return improved

    # -- end ------------------------------------------------------------------------------
    def summary_metrics(self) -> dict[str, float]:
        final = self.history[-1] if self.history else {}
        best = self.best or {}
        nan = float("nan")  # no accuracy (an autoencoder) or no loss yet
        return {
            "best_val_acc": best.get("val_acc", 0.0 if not best else nan),
            "best_val_loss": best.get("val_loss", nan),
            "final_val_acc": final.get("val_acc", 0.0 if not final else nan),
            "final_val_loss": final.get("val_loss", nan),
        }

    def finish(self, status: str, error: str | None = None) -> dict:
        if error:
            self.extra["error"] = error
        self.writer.flush()
        self.writer.close()
        self.metrics = self._write(status)
        self._finish_trackers(status)
        return self.metrics

    def _finish_trackers(self, status: str) -> None:
        """Each tracker's end: the summary, the learning curves, the status. One that fails
        (its server gone) is a warning: metrics.json is written, the run's result stands."""
        curves = self.run_dir / "learning_curves.png"
        epoch = self.history[-1]["epoch"] if self.history else 0
        for tracker in self.trackers:
            try:
                tracker.finish(status, self.summary_metrics(), epoch,
                               curves if curves.is_file() else None)
            except Exception as exc:  # noqa: BLE001 (said, and the record is complete)
                log.warning("trainer.loggers=%s: could not close its record: %s",
                            tracker.name, error_line(exc))

    @contextlib.contextmanager
    def recording(self, curves_title: str | None = None):
        """Closes the record however the block ends: ``completed``, ``paused`` (at
        ``trainer.pause_after_epoch``), ``interrupted`` or ``failed`` (with the error's first
        line), and draws the learning curves of the epochs
        that ran (``curves_title``: the figure's title). The result is in ``self.metrics``."""
        status, error = "completed", None
        try:
            with stops_unwrapped():
                yield self
        except KeyboardInterrupt:
            status, error = "interrupted", "KeyboardInterrupt"
            self._resume_hint()
            raise
        except Interrupted as stop:
            status, error = "interrupted", f"signal {stop.signum}"
            self._resume_hint()
            raise
        except Paused as pause:
            status = "paused"
            self.extra["paused"] = {"epoch": pause.epoch, "of": pause.total}
            self._resume_hint()
            raise
        except Exception as exc:
            status, error = "failed", error_line(exc)
            raise
        finally:
            try:  # (a second Ctrl-C while matplotlib is imported: the record still ends)
                if self.history and curves_title is not None and self.writes:
                    with stops_unwrapped():
                        from transferlab.run.plots import save_learning_curves

                        save_learning_curves(self.history, self.run_dir / "learning_curves.png",
                                             curves_title, self.extra.get("stopped_early"))
            finally:
                self.finish(status, error)

    def _resume_hint(self) -> None:
        if (self.run_dir / "checkpoints" / "last.pt").is_file():
            self.extra["resume_command"] = resume_command(self.run_dir)

    def _write(self, status: str) -> dict:
        final = self.history[-1] if self.history else None
        data = {
            "status": status,
            "history": self.history,
            "best": self.best,
            "final": _summary(final) if final else None,
            "params": self.params,
            "wall_seconds": round(self.wall_before + time.perf_counter() - self.started, 3),
            **self.extra,
            "updated_at": round(time.time(), 3),  # the heartbeat: every write
        }
        if not self.writes:
            return data
        atomic_write_text(self.metrics_path, json.dumps(finite(data), indent=2, allow_nan=False))
        return data


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: strict JSON (``null``), which every
    JSON parser reads (bare ``NaN`` is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _summary(record: dict) -> dict:
    """The ``best`` / ``final`` entry of an epoch record (no ``val_acc`` when it has none)."""
    return {k: record[k] for k in ("epoch", "val_acc", "val_loss", "val_acc_ema", "val_loss_ema")
            if k in record}

