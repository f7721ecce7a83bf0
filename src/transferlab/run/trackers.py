"""Trackers: where a run's record goes besides ``metrics.json`` (``trainer.loggers``;
docs/trackers.md).

The record (:class:`~transferlab.run.record.RunTracker`) is what the run's hooks write to: the
``Record`` hook gives it the stage table at a stage's start and every epoch's record at its
end, the freeze ledger and early stopping their lines. It hands each of these on to every
tracker the run selected, so that every tracker gets the same things under the names
``metrics.json`` uses: the composed config (flattened, as params), every epoch's numbers
(``val_acc``, ``val_loss``, ``lr.<group>``... at step = epoch), the texts (the stage table
``summary/<stage>``...), and at the end the learning curves and the run's status.

Each tracker is an entry of :data:`TRACKERS` (a :class:`Tracker` subclass) and owns what it
knows: its package (imported only when it is selected), where it writes, how a resumed run
continues its record (:data:`STATE_FILE` in the run directory) and what a sweep is for it
(:func:`start_sweep`, :func:`end_sweep`: the Hydra callback calls them in the launching
process; an MLflow sweep is one parent run whose children are the jobs). Under DDP only rank
0 writes (the record opens no tracker elsewhere).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

from transferlab.errors import UserError, did_you_mean, error_line
from transferlab.infra.run_dirs import JOB_MARK, atomic_write_text

log = logging.getLogger("transferlab")

STATE_FILE = "trackers.json"  # in a run directory: each tracker's id of the run (resumes)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``trainer.ema.decay``); lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def epoch_metrics(record: dict) -> dict[str, int | float]:
    """An epoch's numbers under ``metrics.json``'s names (``lr`` per group: ``lr.<group>``);
    strings (the stage's name) and non-finite values left out."""
    return {k: v for k, v in flatten(record).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def needs(module: str, extra: str, logger: str):
    """``module`` imported, or the one-line error that says which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"trainer.loggers={logger} needs {module}, which is not installed: "
                        f"pip install 'transferlab[{extra}]'") from None


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(run_dir: Path, name: str, state: dict) -> None:
    """Keep ``state`` as tracker ``name``'s entry of the run's :data:`STATE_FILE`."""
    atomic_write_text(run_dir / STATE_FILE,
                      json.dumps({**read_state(run_dir), name: state}, indent=2))


def sweep_root(run_dir: Path, marker: str) -> Path | None:
    """The sweep directory above a sweep's job directory (it holds the job's mark) where
    ``marker`` lies, or None (a run of its own; a sweep without that tracker)."""
    if not (run_dir / JOB_MARK).is_file():
        return None
    for folder in list(run_dir.resolve().parents)[:3]:
        if (folder / marker).is_file():
            return folder
    return None


class Tracker:
    """One tracker of a run's record. The record calls :meth:`start` when it opens (a fresh
    run or a resumed one), :meth:`log_text`, :meth:`log_epoch` (``history``: every epoch so
    far, this one last), and :meth:`finish` however the run ends (``curves``: the learning
    curves' PNG, when the run drew them)."""

    name: ClassVar[str]

    def __init__(self, run_dir: Path, trainer: dict):
        self.run_dir, self.trainer = run_dir, trainer

    def summary_writer(self):
        """The record's TensorBoard writer when this tracker is TensorBoard, else None."""
        return None

    def start(self, params: dict[str, Any], resumed: bool) -> None: ...

    def log_text(self, tag: str, text: str, step: int) -> None: ...

    def log_epoch(self, record: dict, history: list[dict]) -> None: ...

    def finish(self, status: str, summary: dict[str, float], epoch: int,
               curves: Path | None) -> None:
        """``summary``: best and final val accuracy and loss; ``epoch``: the last one."""

    @classmethod
    def log_export(cls, run_dir: Path, folder: Path, state: dict) -> str | None:
        """Attach the files of an export of the run (``folder``, by ``transferlab-export``) to
        the run's record in this tracker (``state``: its entry in :data:`STATE_FILE`); where
        they went, or None where this tracker keeps no files."""
        return None

    @classmethod
    def start_sweep(cls, sweep_dir: Path, trainer: dict) -> None:
        """In the process that launches a sweep, before its jobs."""

    @classmethod
    def end_sweep(cls, sweep_dir: Path, trainer: dict, status: str) -> None:
        """When the sweep's jobs have ended (``status`` as a run's)."""


TRACKERS: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    if cls.name in TRACKERS:
        raise ValueError(f"tracker {cls.name!r} is registered twice")
    TRACKERS[cls.name] = cls
    return cls


def entries(trainer: dict) -> list[type[Tracker]]:
    """The tracker entries ``trainer.loggers`` selects, in its order."""
    chosen = []
    for name in trainer.get("loggers") or []:
        if name not in TRACKERS:
            raise UserError(f"unknown trainer.loggers {name!r}{did_you_mean(name, TRACKERS)}; "
                            f"choose from {', '.join(TRACKERS)}")
        chosen.append(TRACKERS[name])
    return chosen


def open_trackers(run_dir: Path, config: dict, resumed: bool) -> list[Tracker]:
    """The run's trackers, started (params: the flattened config, for a fresh run)."""
    trainer = config.get("trainer") or {}
    trackers = [entry(run_dir, trainer) for entry in entries(trainer)]
    params = flatten(config)
    for tracker in trackers:
        tracker.start(params, resumed)
    return trackers


def log_export(run_dir: Path, folder: Path) -> dict[str, str]:
    """The exported model's files (``folder``) attached to the run's record in every tracker
    the run logged to (its :data:`STATE_FILE` says which) that keeps files: {tracker: where}."""
    attached = {}
    for name, state in read_state(run_dir).items():
        where = TRACKERS[name].log_export(run_dir, folder, state) if name in TRACKERS else None
        if where is not None:
            attached[name] = where
    return attached


def start_sweep(sweep_dir: Path, trainer: dict) -> None:
    for entry in entries(trainer):
        entry.start_sweep(sweep_dir, trainer)


def end_sweep(sweep_dir: Path, trainer: dict, status: str) -> None:
    for entry in entries(trainer):
        entry.end_sweep(sweep_dir, trainer, status)


@register
class TensorBoard(Tracker):
    """``tb/`` in the run directory: the record's own event stream (scalars under
    ``train/``, ``val/``, ``lr/``, texts, images, HParams): docs/sweeps.md."""

    name = "tensorboard"

    def summary_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tb"))


@register
class Csv(Tracker):
    """``metrics.csv`` in the run directory: one row per epoch of ``metrics.json``'s history,
    its numbers and stage name (``lr.<group>`` columns), rewritten after every epoch (a
    resumed run's rows are those of its record)."""

    name = "csv"

    def log_epoch(self, record: dict, history: list[dict]) -> None:
        rows = [{"epoch": r["epoch"], "stage": r.get("stage", ""), **epoch_metrics(r)}
                for r in history]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", out.getvalue())


MLFLOW_PARENT = ".mlflow_sweep.json"  # in a sweep directory: the parent run of its jobs
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED"}  # else KILLED (it may resume)
MLFLOW_EXPORT = "export"  # the artifact folder of transferlab-export's files in a run


def _mlflow_client(trainer: dict, uri: str | None = None):
    """MLflow's client for ``uri`` (else ``trainer.mlflow.tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else MLflow's default) and the URI it resolved to (a relative
    SQLite path made absolute: a resume from another directory finds the same store)."""
    mlflow = needs("mlflow", "mlflow", "mlflow")
    uri = uri or (trainer.get("mlflow") or {}).get("tracking_uri") or mlflow.get_tracking_uri()
    scheme, _, path = uri.partition(":///")
    if scheme == "sqlite" and path and not path.startswith("/"):
        uri = f"sqlite:///{Path(path).resolve()}"
    with _store_errors(uri):  # (a SQL store is opened, and its tables made, here)
        return mlflow.tracking.MlflowClient(tracking_uri=uri), uri


@contextlib.contextmanager
def _store_errors(uri: str):
    """A store that cannot be reached or written: one line naming it and the keys that set it."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"trainer.loggers=mlflow: the tracking store {uri} failed: "
                        f"{error_line(exc)} (set it with trainer.mlflow.tracking_uri or "
                        "$MLFLOW_TRACKING_URI)") from None


def _mlflow_experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # a parallel job created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@register
class MLflow(Tracker):
    """An MLflow run per run (``trainer.mlflow.tracking_uri`` / ``$MLFLOW_TRACKING_URI``, in
    experiment ``trainer.mlflow.experiment``); its id is kept in the run directory, so a
    resumed run goes on with it. A sweep's jobs are children of one parent run, which the
    launching process starts (its id in the sweep directory: :data:`MLFLOW_PARENT`)."""

    name = "mlflow"

    def start(self, params: dict[str, Any], resumed: bool) -> None:
        state = read_state(self.run_dir).get(self.name) if resumed else None
        if state:  # the run's own MLflow run, where it was started
            self.client, self.uri = _mlflow_client(self.trainer, state["tracking_uri"])
            self.run_id = state["run_id"]
            with _store_errors(self.uri):
                self.client.update_run(self.run_id, status="RUNNING")
            return
        self.client, self.uri = _mlflow_client(self.trainer)
        with _store_errors(self.uri):
            self._start(params)

    def _start(self, params: dict[str, Any]) -> None:
        experiment = _mlflow_experiment(self.client, self.trainer["mlflow"]["experiment"])
        tags = {"transferlab.run_dir": str(self.run_dir.resolve())}
        parent = sweep_root(self.run_dir, MLFLOW_PARENT)
        if parent is not None:
            parent_state = json.loads((parent / MLFLOW_PARENT).read_text())
            experiment = parent_state["experiment_id"]
            tags["mlflow.parentRunId"] = parent_state["run_id"]
        run = self.client.create_run(experiment, run_name=self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        write_state(self.run_dir, self.name, {"tracking_uri": self.uri, "run_id": self.run_id,
                                              "experiment_id": experiment})
        self._log_params(params)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], param_text(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"text/{tag}.txt")

    def log_epoch(self, record: dict, history: list[dict]) -> None:
        self._log_metrics(epoch_metrics(record), record["epoch"])

    def finish(self, status: str, summary: dict[str, float], epoch: int,
               curves: Path | None) -> None:
        self._log_metrics({k: v for k, v in summary.items() if math.isfinite(v)}, epoch)
        if curves is not None:
            self.client.log_artifact(self.run_id, str(curves))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "KILLED"))

    @classmethod
    def start_sweep(cls, sweep_dir: Path, trainer: dict) -> None:
        """The sweep's parent run (a sweep launched again, ``resume=auto``: the same one)."""
        path = sweep_dir / MLFLOW_PARENT
        if path.is_file():
            state = json.loads(path.read_text())
            client, _ = _mlflow_client(trainer, state["tracking_uri"])
            client.update_run(state["run_id"], status="RUNNING")
            return
        client, uri = _mlflow_client(trainer)
        with _store_errors(uri):
            experiment = _mlflow_experiment(client, trainer["mlflow"]["experiment"])
            run = client.create_run(experiment, run_name=sweep_dir.name, tags={
                "transferlab.sweep_dir": str(sweep_dir.resolve())})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"tracking_uri": uri, "run_id": run.info.run_id,
                                            "experiment_id": experiment}, indent=2))

    @classmethod
    def log_export(cls, run_dir: Path, folder: Path, state: dict) -> str | None:
        """The export's files as artifacts of the run's MLflow run, under ``export/``."""
        client, uri = _mlflow_client({}, state["tracking_uri"])
        with _store_errors(uri):
            client.log_artifacts(state["run_id"], str(folder), MLFLOW_EXPORT)
        return f"runs:/{state['run_id']}/{MLFLOW_EXPORT} ({uri})"

    @classmethod
    def end_sweep(cls, sweep_dir: Path, trainer: dict, status: str) -> None:
        path = sweep_dir / MLFLOW_PARENT
        if path.is_file():
            state = json.loads(path.read_text())
            client, _ = _mlflow_client(trainer, state["tracking_uri"])
            client.set_terminated(state["run_id"], MLFLOW_STATUS.get(status, "KILLED"))


WANDB_GROUP = ".wandb_sweep"  # in a sweep directory: its jobs are one W&B group


@register
class Wandb(Tracker):
    """A Weights & Biases run (``trainer.wandb.project``; ``trainer.wandb.mode=offline``, the
    default, needs no network: ``wandb sync <run dir>/wandb/offline-run-*`` uploads it). Its
    files go to ``<run dir>/wandb/``; its id is kept in the run directory (a resumed run goes
    on with it); a sweep's jobs are one group, named after the sweep directory."""

    name = "wandb"

    def start(self, params: dict[str, Any], resumed: bool) -> None:
        wandb = needs("wandb", "wandb", "wandb")
        state = read_state(self.run_dir).get(self.name) or {}
        run_id = state.get("id") or uuid.uuid4().hex[:8]
        sweep = sweep_root(self.run_dir, WANDB_GROUP)
        self.run = wandb.init(
            project=self.trainer["wandb"]["project"], dir=str(self.run_dir),
            mode=str(self.trainer["wandb"]["mode"]), id=run_id, resume="allow",
            name=self.run_dir.name, group=sweep.name if sweep is not None else None,
            config=None if resumed else params,
            settings=wandb.Settings(silent=True, x_disable_stats=True, save_code=False))
        write_state(self.run_dir, self.name, {"id": run_id})

    def log_text(self, tag: str, text: str, step: int) -> None:
        import wandb

        # (with the next epoch's row: W&B takes no step at or before its last one)
        self.run.log({f"text/{tag}": wandb.Html(f"<pre>{_escaped(text)}</pre>")}, commit=False)

    def log_epoch(self, record: dict, history: list[dict]) -> None:
        self.run.log(epoch_metrics(record), step=record["epoch"])

    def finish(self, status: str, summary: dict[str, float], epoch: int,
               curves: Path | None) -> None:
        import wandb

        self.run.summary.update({k: v for k, v in summary.items() if math.isfinite(v)})
        if curves is not None:
            self.run.log({"learning_curves": wandb.Image(str(curves))}, step=epoch)
        self.run.finish(exit_code=0 if status == "completed" else 1)

    @classmethod
    def start_sweep(cls, sweep_dir: Path, trainer: dict) -> None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / WANDB_GROUP).write_text(sweep_dir.name + "\n")


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
