"""A sweep job in a process of its own, so that one job's death or a Ctrl-C does not lose the
sweep (no torch here).

Hydra's joblib launcher runs the jobs in loky worker processes that several jobs share, and
loky ends them all when one dies: a SIGKILLed job (the OOM killer's, a user's) took its
sibling jobs and the sweep's summary with it, and on Ctrl-C the sweep's main process tore the
workers down before their jobs had saved a checkpoint. So:

- :func:`run_in_child`: a worker runs each job in a child process it forks. A child that dies
  ends one job, never the worker: the worker marks the job's ``metrics.json`` (``failed``,
  with how the process ended: :func:`record_end`) and takes the next job.
- :class:`SweepStop`: in the sweep's main process, SIGINT and SIGTERM are passed on to the
  workers, which pass them on to their jobs: each finishes its step, saves a checkpoint and
  ends ``interrupted``, as one run does; a second Ctrl-C stops them at once. The stop is also
  written into the sweep directory (:data:`STOP_MARK`), so a job that had not started yet is
  not started (:func:`stop_requested`). A worker that runs a job leaves the terminal's process
  group: a Ctrl-C reaches the main process alone, and each job gets the signal once.

``hydra/launcher=ray_tasks`` runs each job the same way in a child of its Ray worker; those
workers are not the sweep's children (and block SIGINT), so the sweep signals the jobs
themselves, by the pids of their running records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.errors import Interrupted
from transferlab.infra.liveness import run_status
from transferlab.infra.processes import warn_from_signal_handler
from transferlab.infra.run_dirs import atomic_write_text

log = logging.getLogger("transferlab")

STOP_MARK = ".transferlab_stop"  # in a sweep directory: "<launch id> <signal>" of its stop
STOPS = (signal.SIGINT, signal.SIGTERM)


# --- the sweep's main process ----------------------------------------------------------------


class SweepStop:
    """SIGINT / SIGTERM of a sweep whose jobs run in worker processes: the first is written to
    the sweep directory and passed on to the workers that run jobs (they pass it to their job,
    which saves a checkpoint and ends ``interrupted``); the sweep then waits for its jobs. A
    second Ctrl-C is passed on too (the jobs stop at once, unsaved); a third ends the sweep
    without waiting for them."""

    def __init__(self, sweep_dir: Path, launch_id: str, *, remote_workers: bool = False):
        self.sweep_dir, self.launch_id = Path(sweep_dir), launch_id
        # the workers are not this process's children (Ray's): the signals go to the jobs'
        # own processes, found by their running records
        self.remote_workers = remote_workers
        self.signum: int | None = None
        self.count = 0  # the SIGINTs so far
        self.owner = os.getpid()
        self._previous: dict[int, Any] = {}

    def install(self) -> SweepStop:
        self._previous = {s: signal.getsignal(s) for s in STOPS}
        for s in STOPS:
            signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def clear(self) -> None:
        """Remove the stop's mark (the sweep ended: ``resume=auto`` runs its jobs again)."""
        with contextlib.suppress(OSError):
            (self.sweep_dir / STOP_MARK).unlink()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.owner:
            return
        name = signal.Signals(signum).name
        self.count += signum == signal.SIGINT
        if self.signum is None:
            self.signum = signum
            with contextlib.suppress(OSError):
                (self.sweep_dir / STOP_MARK).write_text(f"{self.launch_id} {name}\n")
            warn_from_signal_handler(log, "%s: the sweep's jobs finish their step and save a "
                                     "checkpoint; no new job starts (Ctrl-C again to stop them "
                                     "at once)", name)
        elif self.count == 2:
            warn_from_signal_handler(log, "%s again: the sweep's jobs stop at once (Ctrl-C "
                                     "again to end the sweep without waiting for them)", name)
        if self.count > 2:
            raise KeyboardInterrupt
        for pid in running_jobs(self.sweep_dir) if self.remote_workers else job_workers():
            with contextlib.suppress(OSError):
                os.kill(pid, signum)


def job_workers() -> list[int]:
    """The pids of this process's worker processes that run jobs (those that left its process
    group: :func:`run_in_child`); a worker not yet running a job keeps loky's handlers."""
    mine = os.getpgrp()
    pids = []
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError):
            if child.pid is not None and os.getpgid(child.pid) != mine:
                pids.append(child.pid)
    return pids


def running_jobs(sweep_dir: Path) -> list[int]:
    """The pids of the sweep's jobs that run on this machine (their records ``running``)."""
    pids = []
    for job in _job_dirs(sweep_dir):
        record = _record(job)
        if record is not None and run_status(record) == "running" \
                and record.get("host") == socket.gethostname() \
                and isinstance(record.get("pid"), int):
            pids.append(record["pid"])
    return pids


def stop_requested(sweep_dir: Path, launch_id: str) -> bool:
    """Whether the sweep launched as ``launch_id`` was stopped (a job then does not start)."""
    try:
        return (Path(sweep_dir) / STOP_MARK).read_text().split()[0] == launch_id
    except (OSError, IndexError):
        return False


# --- a worker process: each job in a child ------------------------------------------------------


class _Forward:
    """A worker's SIGINT / SIGTERM handler: passed on to the job it runs, if any (the worker
    itself never stops on them: the sweep's main process decides)."""

    child: int | None = None

    @classmethod
    def handle(cls, signum, frame) -> None:
        if cls.child is not None:
            with contextlib.suppress(OSError):
                os.kill(cls.child, signum)


_worker_handlers: dict[int, Any] = {}  # the worker's own, before :class:`_Forward`'s


def _become_job_worker() -> None:
    """Leave the terminal's process group (a Ctrl-C then reaches the sweep's main process
    alone, which passes it on) and pass stop signals on to the job; once per worker."""
    if _worker_handlers:
        return
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for s in STOPS:
        _worker_handlers[s] = signal.getsignal(s)
        signal.signal(s, _Forward.handle)


@dataclass
class ChildEnd:
    """How a job's child process ended: its pid, its exit code (``-N``: killed by signal N)
    and what its function returned (None unless it returned)."""

    pid: int
    code: int
    value: Any = None

    @property
    def stopped(self) -> bool:
        """Whether a stop signal (SIGINT, SIGTERM) ended it."""
        return self.code in (-s for s in STOPS) or self.code in (128 + s for s in STOPS)

    @property
    def how(self) -> str:
        if self.code < 0:
            return f"was killed by {_signal_name(-self.code)}"
        return f"exited with code {self.code}"


def run_in_child(body: Callable[[], Any]) -> ChildEnd:
    """Run ``body()`` in a forked child of this (worker) process and wait for it. Its return
    value (JSON) comes back; SIGINT / SIGTERM sent to this process go to the child. The child
    ends with 0, 128 + N when a stop by signal N ended it, 2 (SystemExit's code) or 1 (an
    exception, its traceback on stderr)."""
    _become_job_worker()
    read, write = os.pipe()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        pid = os.fork()
    except OSError:  # (no memory, too many processes) the job is not run
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(read)
        os.close(write)
        raise
    if pid == 0:  # the job: the worker's own handlers again, then the body; never back
        code = 1
        try:
            os.close(read)
            for s, handler in _worker_handlers.items():
                signal.signal(s, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # (a Ray worker blocks SIGINT)
            code = _child(body, write)
        finally:
            os._exit(code)
    os.close(write)
    _Forward.child = pid
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        _Forward.child = None
    # read once the child is gone: processes it forked (loader workers) may hold the pipe
    # open, and what it wrote (a number) fits in the pipe's buffer
    os.set_blocking(read, False)
    with os.fdopen(read, "rb", buffering=0) as pipe:
        try:
            data = pipe.read() or b""
        except BlockingIOError:
            data = b""
    try:
        value = json.loads(data) if data else None
    except ValueError:
        value = None
    return ChildEnd(pid, os.waitstatus_to_exitcode(status), value)


def _child(body: Callable[[], Any], write: int) -> int:
    """The child's side of :func:`run_in_child`: its exit code."""
    code = 0
    try:
        value = body()
        with contextlib.suppress(TypeError, ValueError, OSError):
            os.write(write, json.dumps(value).encode())
    except Interrupted as stop:
        code = 128 + stop.signum
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
    return code


def record_end(run_dir: Path, end: ChildEnd) -> str | None:
    """After a job's child ended: a ``metrics.json`` that still says ``running`` (or none:
    it died before its record opened) is closed with how the process ended, ``failed``, or
    ``interrupted`` where a stop signal ended it; the error line, None where the job closed
    its own record."""
    path = run_dir / "metrics.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("status") != "running":
        return None
    error = f"its process (pid {end.pid}) {end.how}"
    record = record if isinstance(record, dict) else {
        "history": [], "best": None, "final": None, "params": {}, "wall_seconds": 0.0}
    record.update(status="interrupted" if end.stopped else "failed", error=error)
    _write_record(run_dir, record)
    return error


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --- the sweep's main process, when its launcher lost a job ------------------------------------


def close_dead_jobs(sweep_dir: Path, cause: str, *, poll_s: float = 0.5,
                    unrecorded_s: float = 120.0) -> list[tuple[str, str]]:
    """After the launcher gave up on a job that died (submitit's ``UncompletedJobError``,
    loky's ``TerminatedWorkerError`` when a worker itself died): wait for the sweep's jobs
    still going (their record ``running``, their process alive; a job directory without a
    record yet, at most ``unrecorded_s``), then close the record of each job whose process
    died ``failed``, saying so. Returns (job directory name, error) of those."""
    started = time.monotonic()
    while True:
        records = {job: _record(job) for job in _job_dirs(sweep_dir)}
        going = [j for j, r in records.items() if r is not None and run_status(r) == "running"]
        unrecorded = [j for j, r in records.items() if r is None]
        if not going and (not unrecorded or time.monotonic() - started > unrecorded_s):
            break
        time.sleep(poll_s)
    closed = []
    for job, record in sorted(records.items()):
        if record is not None and run_status(record) == "dead":
            error = f"its process (pid {record.get('pid')}) died ({cause})"
            record.update(status="failed", error=error)
            _write_record(job, record)
            closed.append((job.name, error))
    return closed


def _job_dirs(sweep_dir: Path) -> list[Path]:
    try:
        return [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name[:1].isdigit()]
    except OSError:
        return []


def _record(job: Path) -> dict | None:
    try:
        record = json.loads((job / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(job: Path, record: dict) -> None:
    with contextlib.suppress(OSError):
        atomic_write_text(job / "metrics.json", json.dumps(record, indent=2))
