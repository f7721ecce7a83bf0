"""What ``transferlab-train`` does with its arguments (:mod:`transferlab.cli.train` parses
``--help`` and hands everything else to :func:`launch`): one run, or a sweep's jobs through
Hydra; ``resume=<run dir>``; ``resume=auto`` (each job of a sweep launched again is skipped,
resumed or started); a submitit job requeued after preemption; one run on N processes under
torchrun. Every decision to train, skip or resume a job is here.

Exit codes: 0 done, 1 a sweep job failed, 2 bad input (one ``error:`` line, before any model
is built or image read), 130 interrupted.

A config is checked before torch is imported (a one-line error takes no more than composing
it): what trains and resumes is imported in the functions that train and resume.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from transferlab.config import composition_error
from transferlab.config.store import register_configs
from transferlab.config.sweep_keys import OPTIONAL_KEYS_ENV, drop_unused, optional_keys, relaxed
from transferlab.config.validate import check_name
from transferlab.errors import EXIT_JOB_FAILED, Interrupted, UserError, stops_unwrapped
from transferlab.infra.cluster import export_submitit_env, hand_over, job_environment
from transferlab.infra.job_process import record_end, run_in_child, stop_requested
from transferlab.infra.processes import (
    env_rank,
    launched,
    quiet_logging,
    rank_tag,
    resume_command,
    shutdown,
)
from transferlab.infra.run_dirs import (
    check_run_dir,
    check_sweep_dir,
    claim_job_dir,
    config_of_run,
    shown,
)
from transferlab.tools.sweep import (
    SWEEP_ID_ENV,
    SweepSummary,
    remember_swept_keys,
    runs_jobs_in_workers,
)

if TYPE_CHECKING:
    from transferlab.run.execute import RunResult

log = logging.getLogger("transferlab")


@hydra.main(version_base="1.3", config_path="pkg://transferlab.conf", config_name="train")
def _main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and runs_jobs_in_workers(hc.launcher):
        return _in_own_process(cfg, hc)
    return _run_job(cfg, hc)


def _in_own_process(cfg: DictConfig, hc) -> float | None:
    """A job in a worker process that several jobs share (joblib, Ray): run in a child of its own
    (:func:`~transferlab.infra.job_process.run_in_child`), so that its death is one failed row
    of the sweep, not the end of the worker and of every other job. A job of a sweep that was
    stopped (Ctrl-C) before it started is not started."""
    run_dir = Path(hc.runtime.output_dir)
    if stop_requested(Path(hc.sweep.dir), os.environ.get(SWEEP_ID_ENV, "?")):
        log.info("job %s not started: the sweep was stopped", hc.job.num)
        return None
    end = run_in_child(lambda: _run_job(cfg, hc))
    error = record_end(run_dir, end) if end.code else None
    if error and not end.stopped:  # (a stop: the sweep's line says how to go on)
        print(f"error: job {hc.job.num}: {error}", file=sys.stderr, flush=True)
    return end.value


def _run_job(cfg: DictConfig, hc) -> float | None:
    """The job (or the one run) Hydra composed: its best validation accuracy (the objective
    of a search); a job of a sweep that fails is recorded as such and returns None."""
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:  # keys of the sweep that this job's options do not have
        keys = [k for k in os.environ.get(OPTIONAL_KEYS_ENV, "").split(",") if k]
        cfg, overrides = drop_unused(cfg, overrides, keys)
    export_submitit_env()  # a submitit job of several tasks: torch.distributed's env://
    if env_rank() > 0:
        quiet_logging(env_rank())  # after Hydra's own logging setup
    try:
        sweep = hc.job.num if hc.mode == RunMode.MULTIRUN else None
        with stops_unwrapped():  # (a Ctrl-C that landed in an import is a stop, not a failure)
            result = _job(cfg, run_dir, overrides, sweep=sweep)
    except Interrupted as stop:
        hand_over(stop.signum)  # submitit's preemption signal: requeued (rank 0 exits here)
        raise
    except UserError as exc:
        if hc.mode != RunMode.MULTIRUN:
            # SystemExit passes through Hydra (it reports an Exception on lines of its own)
            print(f"{rank_tag()}error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        # The sweep goes on; this job's metrics.json says why it failed.
        print(f"error: job {hc.job.num}: {exc}", file=sys.stderr, flush=True)
        return None
    except Exception as exc:
        if hc.mode != RunMode.MULTIRUN:
            raise
        # One broken job must not stop the sweep: its log keeps the traceback, its
        # metrics.json the first line; the summary at the end counts it as failed.
        log.exception("job failed")
        print(f"error: job {hc.job.num} failed: {exc}", file=sys.stderr, flush=True)
        if (signum := _late_stop()) is not None:  # it failed after a stop was asked for:
            raise Interrupted(signum) from None  # the sweep stops before its next job
        return None
    if env_rank() == 0:
        _say_saved(run_dir)
    if hc.mode == RunMode.MULTIRUN and (signum := _late_stop()) is not None:
        raise Interrupted(signum)  # Ctrl-C at the run's very end: the job completed, the
    return result.best_val_acc     # sweep stops before the next


def _late_stop() -> int | None:
    """A stop (SIGINT / SIGTERM) asked for during the job that did not end it with
    :class:`Interrupted` (:meth:`StopRequest.take_late`); None where no run of this process
    reached its fit (the module that handles stops is not even imported)."""
    hooks = sys.modules.get("transferlab.run.hooks")
    return hooks.StopRequest.take_late() if hooks is not None else None


def _job(cfg: DictConfig, run_dir: Path, overrides: list[str], *,
         sweep: int | None) -> RunResult:
    """One job: a sweep's job launched again (``resume=auto``), a requeued submitit job, or a
    run, whose config is checked before torch is imported (a refused run leaves no directory;
    a refused job of a sweep, number ``sweep``, a failed row; a job directory is never shared
    by two jobs: :func:`~transferlab.infra.run_dirs.claim_job_dir`). Under DDP the process
    group is joined (from torchrun's or submitit's environment) when the run starts."""
    if cfg.get("resume") == "auto":
        return _auto_job(cfg, run_dir, overrides)
    if job_environment() is not None:  # a submitit job: requeued after preemption / its time
        from transferlab.run.resume import requeued_action  # limit? (its own directory)

        if action := requeued_action(run_dir, _pause_of(cfg)):
            return _go_on(cfg, run_dir, overrides, action, requeued=True)
    if sweep is not None:
        claim_job_dir(run_dir, os.environ.get(SWEEP_ID_ENV, "?"), sweep)
    run = config_of_run(cfg, overrides, run_dir, record_refusal=sweep is not None)  # no torch
    from transferlab.run.execute import train

    return train(run, run_dir, overrides=overrides)


def _distributed(argv: list[str], multirun: bool, resume: str | None) -> None:
    """Under torchrun: one run on every process. The run directory is checked before the
    processes meet (no process has written yet), then the process group is joined; processes
    other than rank 0 leave Hydra's ``.hydra/`` and log file to rank 0 and log warnings only."""
    if multirun:
        raise UserError("-m under torchrun: torchrun trains one run on several processes; start "
                        "one torchrun per run of the sweep")
    from transferlab.infra.distributed import init_from_env

    if resume in (None, "", "null"):
        check_run_dir(argv)
    world = init_from_env()
    if not world.main:
        quiet_logging(world.rank)
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none",
                     "hydra/hydra_logging=none"]


def _auto_job(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> RunResult:
    """A job of a sweep launched again with ``resume=auto``: skip it when it completed, go on
    with it when it left a checkpoint, start it (again) otherwise."""
    from transferlab.run.execute import train
    from transferlab.run.resume import clear_unfinished, job_action

    action = job_action(run_dir, _pause_of(cfg))
    if action == "busy":
        raise UserError(f"{run_dir} is still running in another process")
    if action == "start":
        clear_unfinished(run_dir)
        return train(cfg, run_dir, overrides=overrides)
    return _go_on(cfg, run_dir, overrides, action, requeued=False)


def _go_on(cfg: DictConfig, run_dir: Path, overrides: list[str], action: str, *,
           requeued: bool) -> RunResult:
    """``skip`` a job that completed before, or ``resume`` it from its ``last.pt``, which must
    hold the config composed now. ``requeued``: a submitit job started again (its earlier
    attempt was preempted or reached its time limit)."""
    from transferlab.config import load_config
    from transferlab.infra.checkpoint import load_checkpoint
    from transferlab.run.execute import RunResult, resume_run
    from transferlab.run.resume import PAUSE, read_status, same_config

    if action == "skip":
        status = read_status(run_dir)
        log.info("%s %s before: not run again", run_dir, status.get("status"))
        return RunResult(run_dir, status)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt").get("config") or {}
    differ = same_config(saved, load_config(cfg, overrides).as_dict())
    if differ:
        raise UserError(f"{'requeued job' if requeued else 'resume=auto'}: {run_dir} holds a "
                        f"run of another config ({', '.join(differ[:5])} differ): launch the "
                        "sweep as it was")
    pause = _pause_of(cfg)  # the job's own pause point (a halving sweep's rung), if any
    return resume_run(run_dir, [f"{PAUSE}={pause}"] if pause is not None else None,
                      requeued=requeued)


def _pause_of(cfg: DictConfig) -> int | None:
    """The pause point a job is launched with (``trainer.pause_after_epoch``)."""
    return cfg.get("trainer", {}).get("pause_after_epoch")


def _resume_one(run_dir: Path, overrides: list[str]) -> int:
    """``transferlab-train resume=<run dir> [allowed overrides]``: no new composition, the
    run's saved config; the log goes on in its ``train.log``."""
    from transferlab.run.execute import resume_run

    if env_rank() == 0:
        _log_to(run_dir / "train.log")
    result = resume_run(run_dir, overrides)
    if env_rank() == 0:
        _say_saved(run_dir)
    return 0 if result.metrics.get("status") in ("completed", "paused") else EXIT_JOB_FAILED


def _say_saved(run_dir: Path) -> None:
    """Where the run is, relative to the working directory when it is below it."""
    where = shown(run_dir)
    print(f"\nRun saved to: {where}\nOpen it in TensorBoard: tensorboard --logdir {where}",
          flush=True)


def _log_to(path: Path) -> None:
    """The console and the run's log file, as Hydra's job logging sets them up."""
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path, mode="a")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


# Flags that print something instead of running (a launcher may be given with them).
_INFO_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "-p", "--package")


def check_launcher(argv: list[str]) -> None:
    """``hydra/launcher=...`` launches the jobs of a sweep: without ``-m`` Hydra would run the
    one run here, on this machine, and say nothing."""
    launcher = next((a for a in argv if a.lstrip("+").startswith("hydra/launcher=")), None)
    if launcher and not any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        raise UserError(f"{launcher} launches the jobs of a sweep: add -m (one run as one job: "
                        f"transferlab-train -m {launcher} <overrides>)")


def check_one_process(argv: list[str]) -> None:
    """``trainer.distributed.*`` acts on a run of several processes: given to one run that
    torchrun did not start, it would do nothing (a sweep may give it to jobs that a launcher
    starts on several processes: not checked there)."""
    if launched():
        return
    for item in argv:
        key = item.lstrip("+~").partition("=")[0]
        if key.startswith("trainer.distributed."):
            raise UserError(f"{key} acts on a run of several processes and this one has one: "
                            f"start it with torchrun --nproc_per_node=N -m transferlab.train "
                            f"..., or remove {item!r}")


def _is_hydra_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("hydra", "omegaconf")


def _how_to_go_on(argv: list[str], multirun: bool, run_dir: Path | None) -> str:
    """What the line of an interrupted command adds: the command that goes on. A sweep: the
    same command with ``resume=auto`` (it skips the jobs that completed, resumes the one
    stopped, starts the rest); one run with a checkpoint: ``resume=<run dir>``, under
    torchrun with as many processes."""
    if multirun:
        same = [a for a in argv if not a.startswith("resume=") and a not in ("-m", "--multirun")]
        return f": go on with transferlab-train -m {shlex.join(same)} resume=auto"
    if run_dir is not None and (run_dir / "checkpoints" / "last.pt").is_file():
        return f": go on with {resume_command(shown(run_dir))}"
    return ""


def _sweep_stopped_by() -> int | None:
    """The signal that stopped a sweep whose jobs ran in worker processes (they saved and
    ended ``interrupted``), None where none did; the sweep's signal handlers are restored and
    its stop mark removed (``resume=auto`` then runs its jobs)."""
    stop = SweepSummary.stop
    if stop is None:
        return None
    stop.restore()
    if stop.signum is not None:
        stop.clear()
    return stop.signum


def _lost_a_job(exc: BaseException) -> bool:
    """Whether the launcher gave up because a job's process died: submitit's job without a
    result, a joblib worker or a Ray worker that died itself (a job's death is contained in
    it)."""
    kinds = [getattr(sys.modules.get(module), name, None) for module, name in (
        ("submitit.core.utils", "UncompletedJobError"),
        ("joblib.externals.loky.process_executor", "TerminatedWorkerError"),
        ("ray.exceptions", "WorkerCrashedError"))]
    return isinstance(exc, tuple(k for k in kinds if isinstance(k, type)))


def _after_lost_job(argv: list[str], exc: BaseException) -> int:
    """The launcher gave up on a job whose process died: the jobs still going end first, the
    dead ones are failed rows saying so, and the sweep's table prints (exit 1), with how to
    go on with the jobs that did not end (``resume=auto``)."""
    from transferlab.infra.job_process import close_dead_jobs

    sweep_dir = SweepSummary.sweep_dir
    cause = type(exc).__name__
    for name, error in close_dead_jobs(sweep_dir, cause):
        print(f"error: job {name.partition('_')[0]}: {error}", file=sys.stderr, flush=True)
    SweepSummary.summarize(sweep_dir)
    print(f"error: the launcher stopped when a process of the sweep died ({cause})"
          f"{_how_to_go_on(argv, True, None)}", file=sys.stderr, flush=True)
    return EXIT_JOB_FAILED


def _cross_option_keys(argv: list[str]) -> list[str]:
    """A sweep across the options of a group: its keys that only some of those options have
    apply to the jobs whose option has them (:mod:`transferlab.config.sweep_keys`); one line
    says which jobs do not use each. Hydra reads ``sys.argv``: it is rewritten too."""
    keys = optional_keys(argv)
    if not keys:
        return argv
    for key in keys:
        print(key.line(), flush=True)
    os.environ[OPTIONAL_KEYS_ENV] = ",".join(k.key for k in keys)
    new = relaxed(argv, keys)
    sys.argv[len(sys.argv) - len(argv):] = new
    return new


def launch(argv: list[str]) -> int:
    """Run ``transferlab-train <argv>`` (Hydra reads ``sys.argv`` itself); the exit code."""
    register_configs()
    multirun = any(a in ("-m", "--multirun") for a in argv)
    resume = next((a.partition("=")[2] for a in argv if a.startswith("resume=")), None)
    try:
        if launched():
            _distributed(argv, multirun, resume)
        os.environ.pop(OPTIONAL_KEYS_ENV, None)
        if multirun:
            argv = _cross_option_keys(argv)
        if resume not in (None, "", "null", "auto"):
            if multirun:
                raise UserError("resume=<run dir> goes on with one run; to go on with a sweep, "
                                "launch it again with resume=auto")
            code = _resume_one(Path(resume), [a for a in argv if not a.startswith("resume=")])
            shutdown()
            return code
        if resume == "auto":
            if not multirun:
                raise UserError("resume=auto is for sweeps (-m); go on with one run with "
                                "resume=<run dir>")
            if not any(a.startswith("hydra.sweep.dir=") for a in argv):
                from transferlab.run.resume import find_sweep

                found = find_sweep(argv)
                if found is not None:
                    print(f"resume=auto: going on with {found}", flush=True)
                    sys.argv.append(f"hydra.sweep.dir={found}")
        for item in argv:  # (before Hydra claims a directory by it)
            if item.lstrip("+").startswith("name="):
                check_name(item.partition("=")[2])
        if not multirun:
            check_launcher(argv)
            check_one_process(argv)
        if not multirun and not launched():  # (under torchrun: before the processes met)
            check_run_dir(argv)
        if multirun:
            check_sweep_dir(argv)
        remember_swept_keys(argv)
        SweepSummary.reset()
        # Hydra re-raises instead of printing its multi-line report: every error is ours.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            _main()  # Hydra reads sys.argv itself
        except Exception as exc:
            if (signum := _sweep_stopped_by()) is not None:  # (a worker stopped at its start)
                raise Interrupted(signum) from None
            if _lost_a_job(exc) and SweepSummary.sweep_dir is not None:
                return _after_lost_job(argv, exc)
            if _is_hydra_error(exc):  # (Hydra's missing option is an OSError too)
                raise composition_error(exc) from None
            if isinstance(exc, OSError):  # the machine's, not a bug: unwritable, a full disk
                where = f" ({exc.filename})" if exc.filename else ""
                raise UserError(f"{exc.strerror or exc}{where}: check the output folder "
                                "(hydra.run.dir / hydra.sweep.dir) and the free disk "
                                "space") from None
            raise  # a bug: the traceback is what to report
        if (signum := _sweep_stopped_by()) is not None:
            raise Interrupted(signum)
    except UserError as exc:
        if rank_tag():  # the same line from every process: say which one
            raise UserError(f"{rank_tag()}{exc}") from None
        raise
    except (Interrupted, KeyboardInterrupt) as stop:
        _sweep_stopped_by()  # (a second Ctrl-C: the sweep's handlers restored)
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"{rank_tag()}interrupted ({signal.Signals(signum).name})"
              f"{_how_to_go_on(argv, multirun, getattr(stop, 'run_dir', None))}",
              file=sys.stderr, flush=True)
        return 128 + signum
    shutdown()
    return EXIT_JOB_FAILED if SweepSummary.failed_jobs else 0
