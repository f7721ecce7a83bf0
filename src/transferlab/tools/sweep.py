"""Multirun support: readable job directory names and the summary printed when a sweep ends.

Job names hold only what varies across the sweep (``3_freeze-two_stage__optimizer.lr-0.001``),
not every fixed override of the command line. Names have no ``=`` and no ``,``, so a path into
a job directory can be given as an override value (``backbone.init.path=...``) unquoted. The
swept keys are read from the command line once, in the launching process, and handed to the
jobs through an environment variable so that launchers running jobs in other processes
(joblib) name them the same way.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import UserError
from transferlab.infra.job_process import SweepStop
from transferlab.infra.run_dirs import SWEEP_DIR_ENV, safe_name
from transferlab.run import trackers

log = logging.getLogger("transferlab")

SWEPT_ENV = "TRANSFERLAB_SWEPT_KEYS"
NAMED_ENV = "TRANSFERLAB_NAME_GIVEN"
SWEEP_NAME_ENV = "TRANSFERLAB_SWEEP_NAME"
SWEEP_ID_ENV = "TRANSFERLAB_SWEEP_ID"  # this launch of a sweep, as its jobs' directories say
RESOLVER = "transferlab_job_name"
SWEEP_RESOLVER = "transferlab_sweep_name"
MAX_NAME = 120

# Keys never worth a place in a job name: Hydra's own settings and the run name.
_SKIP = re.compile(r"^(hydra[./]|name$)")


def swept_keys(argv: list[str]) -> list[str]:
    """Keys of the command-line overrides that sweep (`a=1,2`, `range(...)`, `choice(...)`)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # Hydra itself reports malformed command lines
        return []
    return [o.get_key_element().lstrip("+~") for o in overrides if o.is_sweep_override()]


def remember_swept_keys(argv: list[str]) -> None:
    """Called by the CLI before Hydra starts: what this command line sweeps, and whether it
    names the run."""
    os.environ[SWEPT_ENV] = ",".join(swept_keys(argv))
    os.environ[NAMED_ENV] = "1" if any(a.startswith("name=") for a in argv) else ""
    os.environ.pop(SWEEP_NAME_ENV, None)
    os.environ.pop(SWEEP_DIR_ENV, None)
    os.environ[SWEEP_ID_ENV] = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def job_name(num: Any, task_overrides: list[str], sweeper_params: list[str] | None = None) -> str:
    """``<num>_<key-value__...>`` over the swept keys of this job's overrides.

    With nothing swept (``-m seed=0``) every override is named; with no override, the number.
    """
    keys = {k for k in os.environ.get(SWEPT_ENV, "").split(",") if k}
    keys |= set(sweeper_params or [])
    items = []
    for item in task_overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or _SKIP.match(key):
            continue
        items.append((key, value))
    named = [(k, v) for k, v in items if k in keys] or items
    text = "__".join(f"{k}-{safe_name(v)}" for k, v in named)
    if len(text) > MAX_NAME:
        text = text[: MAX_NAME - 3] + "..."
    return f"{num}_{text}" if text else str(num)


def _resolve_job_name(num: Any, *, _root_: DictConfig) -> str:
    task = list(OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or [])
    params = OmegaConf.select(_root_, "hydra.sweeper.params", default=None)
    return job_name(num, task, list(params.keys()) if params else None)


def sweep_name(name: str, swept: list[str]) -> str:
    """The sweep directory's name: the run ``name`` when given on the command line, else what
    the sweep varies (``sweep-freeze__optimizer.lr``), else the default run name."""
    if os.environ.get(NAMED_ENV) or not swept:
        return safe_name(name)
    return safe_name("sweep-" + "__".join(swept))[:MAX_NAME]


def _resolve_sweep_name(*, _root_: DictConfig) -> str:
    # Every job resolves hydra.sweep.dir with its own config; the first resolution (the
    # launching process, before any job) is kept so that all jobs share one sweep directory.
    cached = os.environ.get(SWEEP_NAME_ENV)
    if cached:
        return cached
    swept = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    params = OmegaConf.select(_root_, "hydra.sweeper.params", default=None)
    swept += [k for k in (params.keys() if params else []) if k not in swept]
    value = sweep_name(str(OmegaConf.select(_root_, "name", default="run")), swept)
    os.environ[SWEEP_NAME_ENV] = value
    return value


def register_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve_job_name)
    if not OmegaConf.has_resolver(SWEEP_RESOLVER):
        OmegaConf.register_new_resolver(SWEEP_RESOLVER, _resolve_sweep_name)


register_resolver()  # on import: joblib workers import this module with the task function


# The launchers (``hydra.launcher._target_``'s class) that run jobs in worker processes that
# several jobs share, and where those workers are: ``local``, children of the sweep's process
# (joblib's loky workers: the sweep signals them, they pass it on to their job), or ``remote``
# (the workers of the Ray that ``hydra/launcher=ray_tasks`` starts: the sweep signals the jobs
# by the pids of their running records).
_JOB_WORKERS = {"JoblibLauncher": "local", "RayTasksLauncher": "remote"}


def _job_workers(launcher: DictConfig | None) -> str | None:
    target = str(OmegaConf.select(launcher, "_target_", default="") if launcher else "")
    return _JOB_WORKERS.get(target.rpartition(".")[2])


def runs_jobs_in_workers(launcher: DictConfig | None) -> bool:
    """Whether ``hydra.launcher`` runs the jobs in worker processes that several jobs share
    (Hydra's joblib launcher, ``hydra/launcher=ray_tasks``): each job then runs in a child of
    its worker, and the sweep's stop signals are passed on
    (:mod:`transferlab.infra.job_process`)."""
    return _job_workers(launcher) is not None


class SweepSummary(Callback):
    """Prints the comparison table of a sweep's jobs when it ends, and how many failed. A
    sweep whose jobs run in worker processes passes SIGINT / SIGTERM on to them while it runs
    (:class:`~transferlab.infra.job_process.SweepStop`); a stopped sweep prints no table (the
    CLI prints the line that says how to go on)."""

    failed_jobs = 0  # read by the CLI to choose its exit code
    stop: SweepStop | None = None  # read by the CLI: the signal that stopped the sweep
    sweep_dir: Path | None = None  # the sweep's directory, once it started

    @classmethod
    def reset(cls) -> None:
        """A new launch (in this process): no failed job, no stop, no sweep yet."""
        cls.failed_jobs, cls.stop, cls.sweep_dir = 0, None, None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.sweep_dir = Path(config.hydra.sweep.dir)
        workers = _job_workers(OmegaConf.select(config, "hydra.launcher"))
        if workers is not None:
            SweepSummary.stop = SweepStop(Path(config.hydra.sweep.dir),
                                          os.environ.get(SWEEP_ID_ENV, "?"),
                                          remote_workers=workers == "remote").install()
        try:  # the sweep's record in its trackers (MLflow's parent run)
            trackers.start_sweep(SweepSummary.sweep_dir, _trainer(config))
        except UserError as exc:  # each job then fails with it, one row each
            log.warning("error: %s", exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if SweepSummary.stop is not None and SweepSummary.stop.signum is not None:
            trackers.end_sweep(sweep_dir, _trainer(config), "interrupted")
            return
        self.summarize(sweep_dir)
        trackers.end_sweep(sweep_dir, _trainer(config),
                           "failed" if SweepSummary.failed_jobs else "completed")

    @staticmethod
    def summarize(sweep_dir: Path) -> None:
        """The table of the sweep's jobs, and how many failed (also when its launcher failed
        because a job died: the CLI calls it then)."""
        from transferlab.tools.compare import find_runs, format_table, sort_runs

        runs = sort_runs(find_runs([sweep_dir]), "best_val_acc")
        if not runs:
            return
        failed = [r for r in runs if r.status in ("failed", "dead", "unreadable", "pending")]
        # a job stopped on its own (a SIGTERM to its process alone) while the sweep went on:
        # not done either, so not exit 0
        stopped = [r for r in runs if r.status == "interrupted"]
        SweepSummary.failed_jobs = len(failed) + len(stopped)
        write_sweep_views(sweep_dir, runs)
        also = f", {len(stopped)} interrupted (resume=auto goes on with them)" if stopped else ""
        print(f"\nSweep {sweep_dir}: {len(runs)} job(s), {len(failed)} failed{also}\n"
              f"{format_table(runs, 'table', root=sweep_dir)}\n"
              f"Compare: transferlab-compare {sweep_dir}\n"
              f"Open it in TensorBoard: tensorboard --logdir {sweep_dir}", file=sys.stdout,
              flush=True)


def _trainer(config: DictConfig) -> dict:
    """The sweep's ``trainer`` settings as plain data (what its trackers read)."""
    return OmegaConf.to_container(config.trainer, resolve=True, enum_to_str=True)


def write_sweep_views(sweep_dir: Path, runs) -> None:
    """At the sweep root: the union HParams record of every job and the seed groups' curves
    (TensorBoard then shows every swept key as a column, and seed noise as a band)."""
    from transferlab.tools.compare import group_seeds, write_tensorboard

    done = [r for r in runs if r.status == "completed"]
    try:
        write_tensorboard(sweep_dir, runs, group_seeds(done))
    except OSError as exc:  # the table still prints
        log.warning("could not write the sweep's TensorBoard records: %s", exc)
