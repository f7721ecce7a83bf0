"""Run directories that never collide, finished runs that are never written into, and the
``metrics.json`` of a run that failed before its record opened.

``hydra.run.dir`` is ``${transferlab_claim:outputs/runs/<date>/<time>_<name>}``: the resolver
creates the directory atomically (``mkdir`` without ``exist_ok``) and, when another run took
that name in the same second, takes ``<name>-2``, ``<name>-3``... A process resolves it once
(Hydra reads ``hydra.run.dir`` more than once): the claimed path is remembered.

Under torchrun (one run, several processes) rank 0 claims the directory and every process
takes that one (their clocks may name different seconds).

A run being trained or resumed is locked (:func:`lock_run`): an advisory ``fcntl`` lock on its
``.lock`` file, held by the process that writes the run until the run ends (the kernel lets it
go when the process dies, SIGKILL included). A second process that would write into the run
is refused in one line naming the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from transferlab.config import RunConfig, compose_config, load_config
from transferlab.errors import UserError, error_line
from transferlab.infra.processes import env_rank, launched

if TYPE_CHECKING:
    from transferlab.infra.distributed import World

log = logging.getLogger("transferlab")
LOCK_FILE = ".lock"  # in a run directory: its writer's advisory lock (holds "pid host")
CLAIM_RESOLVER = "transferlab_claim"
_claimed: dict[str, str] = {}
SHARED = "<the run's, of every process>"  # the key of the directory a DDP run claimed


def claim(path: str) -> str:
    """Create ``path`` (or the first free ``path-N``) and return it; under DDP, rank 0's."""
    if not launched():
        return _claim(path)
    from transferlab.infra.distributed import current_world  # (torch: DDP runs only)

    world = current_world()
    if not world.active:
        return _claim(path)
    if SHARED not in _claimed:  # one run per process group: its first claim is the run's
        got, error = world.broadcast(_attempt(path) if world.main else None)
        if error:
            raise UserError(error)
        _claimed[SHARED] = got
    return _claimed[SHARED]


def _attempt(path: str) -> tuple[str | None, str | None]:
    try:
        return _claim(path), None
    except UserError as exc:
        return None, str(exc)


def _claim(path: str) -> str:
    if path in _claimed:
        return _claimed[path]
    base = Path(path)
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot create the run directory {candidate} "
                            f"({exc.strerror or exc}): run from a folder you can write in, or "
                            "set hydra.run.dir=<a writable folder>") from None
        _claimed[path] = str(candidate)
        return str(candidate)
    raise UserError(f"cannot claim a run directory next to {base}: 999 runs of that name "
                    "started in the same second")


SWEEP_CLAIM_RESOLVER = "transferlab_claim_sweep"
SWEEP_DIR_ENV = "TRANSFERLAB_SWEEP_DIR"  # the claimed sweep directory, for the jobs' processes


def claim_sweep(path: str) -> str:
    """The sweep's directory (``hydra.sweep.dir``): claimed as a run's is (created atomically;
    ``<dir>-2``... when another sweep took it, in the same second) by its first resolution, in
    the launching process before any job; every later resolution, in this process or a job's
    (joblib, submitit: they inherit the environment), gets that same directory."""
    if os.environ.get(SWEEP_DIR_ENV):
        return os.environ[SWEEP_DIR_ENV]
    got = _claim(path)
    os.environ[SWEEP_DIR_ENV] = got
    return got


if not OmegaConf.has_resolver(CLAIM_RESOLVER):
    OmegaConf.register_new_resolver(CLAIM_RESOLVER, claim)
if not OmegaConf.has_resolver(SWEEP_CLAIM_RESOLVER):
    OmegaConf.register_new_resolver(SWEEP_CLAIM_RESOLVER, claim_sweep)


_held: set[int] = set()  # the descriptors of the locks this process holds


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: closing its copy
    keeps the lock the parent's alone (it goes when the parent ends, not the last worker)."""
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


@contextlib.contextmanager
def lock_run(run_dir: Path, world: World | None = None) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs. Another process holding it is a one-line
    :class:`UserError` naming its pid. ``world``: the DDP group of the run (rank 0 takes the
    lock, and every process raises its refusal)."""
    fd, error = None, None
    if world is None or world.main:
        try:
            fd = _lock(Path(run_dir))
        except UserError as exc:
            error = str(exc)
    if world is not None and world.active:
        error = world.broadcast(error)
    if error:
        raise UserError(error)
    try:
        yield
    finally:
        if fd is not None:
            _held.discard(fd)
            os.close(fd)


def _lock(run_dir: Path) -> int | None:
    """The descriptor of ``run_dir``'s lock, now this process's; None where the file system
    has no ``flock`` (some cluster mounts): the run goes on unlocked, as before locks."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, host = (os.pread(fd, 200, 0).decode("utf-8", "replace").split() + ["?", "?"])[:2]
        os.close(fd)
        raise UserError(f"{run_dir} is in use by another process (pid {pid} on {host}) that "
                        f"trains or resumes it: wait for it to end, or stop it (kill -INT {pid}), "
                        "then resume again") from None
    except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks on this file system
        os.close(fd)
        log.warning("%s: no lock taken (%s): nothing stops a second resume of this run",
                    run_dir, exc.strerror or exc)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held.add(fd)
    return fd


def check_run_dir(argv: list[str]) -> None:
    """``hydra.run.dir=<dir>`` on the command line must not name a run: a finished (or
    running) run is written into only by ``resume=<dir>``."""
    for item in argv:
        key, _, value = item.partition("=")
        if key.lstrip("+") != "hydra.run.dir" or not value:
            continue
        if "${" in value:  # the directory the run would write into, not the text
            value = _resolved_run_dir(argv) or value
        metrics = Path(value).expanduser() / "metrics.json"
        if not metrics.is_file():
            continue
        try:
            status = json.loads(metrics.read_text()).get("status", "?")
        except (OSError, ValueError, AttributeError):
            status = "unreadable"
        raise UserError(f"hydra.run.dir={value} holds a run ({status}): choose another "
                        f"directory, or go on with that run with resume={value}")


def _resolved_run_dir(argv: list[str]) -> str | None:
    """``hydra.run.dir`` as the run would resolve it (``outputs/fixed/${name}``), from the
    config this command line composes; None when it cannot be resolved here (the run then
    reports why)."""
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        cfg = compose_config(overrides, with_hydra=True)
        return str(OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True))
    except Exception:  # a composition error, an unresolvable interpolation: the run says it
        return None


# What a hydra.sweep.subdir must hold so that no two jobs share a directory.
_UNIQUE_SUBDIR = ("hydra.job.num", "hydra.job.id", "transferlab_job_name")


def check_sweep_dir(argv: list[str]) -> None:
    """A sweep never writes into another's directory: ``hydra.sweep.dir=<dir>`` that holds
    jobs is refused except by ``resume=auto`` (which goes on with it), and a
    ``hydra.sweep.subdir`` must name each job apart (``${hydra.job.num}``...)."""
    auto = "resume=auto" in argv
    for item in argv:
        key, _, value = item.partition("=")
        key = key.lstrip("+")
        if key == "hydra.sweep.dir" and value and not auto:
            jobs = sorted(Path(value).expanduser().glob("*/metrics.json"))
            if jobs:
                raise UserError(f"hydra.sweep.dir={value} holds a sweep ({len(jobs)} job(s)): "
                                "choose another directory, or go on with that sweep with "
                                "resume=auto")
        if key == "hydra.sweep.subdir" and not any(u in value for u in _UNIQUE_SUBDIR):
            raise UserError(f"hydra.sweep.subdir={value} gives every job of the sweep the same "
                            "directory: name each job apart, e.g. "
                            "hydra.sweep.subdir='${hydra.job.num}_my_name'")


JOB_MARK = ".transferlab_job"  # who holds a sweep job's directory: "<sweep id> <job number>"


def claim_job_dir(run_dir: Path, sweep_id: str, num: int) -> None:
    """Mark ``run_dir`` as the directory of job ``num`` of the sweep ``sweep_id``; a directory
    that another job holds (another sweep launched into the same folder at the same time) is
    refused, before the job writes anything."""
    mark, mine = run_dir / JOB_MARK, f"{sweep_id} {num}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        holder = mark.read_text().strip() if mark.is_file() else "?"
        if holder != mine:
            raise UserError(f"job {num}: {run_dir} is the directory of another job ({holder}): "
                            "two sweeps were launched into one folder; launch this one into "
                            "a folder of its own") from None
        return
    with os.fdopen(fd, "w") as f:
        f.write(mine)


def write_failed_metrics(run_dir: Path, exc: BaseException) -> None:
    """A ``metrics.json`` for a run that stopped before its record opened: ``failed`` with the
    error's first line, or ``interrupted``."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    data = {"status": "interrupted" if interrupted else "failed",
            "error": "KeyboardInterrupt" if interrupted else error_line(exc), "history": [],
            "best": None, "final": None, "params": {}, "wall_seconds": 0.0}
    atomic_write_text(run_dir / "metrics.json", json.dumps(data, indent=2))


def config_of_run(cfg: DictConfig, overrides: list[str] | None, run_dir: Path, *,
                  record_refusal: bool = True) -> RunConfig:
    """The checked config of the run in ``run_dir`` (which is created). A config that fails
    its checks raises its one-line error. ``record_refusal`` (a sweep's job: one failed row of
    its sweep): the run's ``metrics.json`` says ``failed`` with it (written by rank 0 of a DDP
    run); otherwise (one run) what Hydra wrote for it is removed, so a run refused before it
    built anything leaves no directory behind. No torch is imported."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load_config(cfg, overrides or [])
    except BaseException as exc:
        if env_rank() == 0:
            if record_refusal or isinstance(exc, KeyboardInterrupt):
                write_failed_metrics(run_dir, exc)
            else:
                remove_refused(run_dir)
        raise


# What Hydra writes into a run's directory before the run starts.
_HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", ".hydra",
                "train.log")


def remove_refused(run_dir: Path) -> None:
    """Remove Hydra's files from the directory of a run that was refused, then the directory
    if nothing else is in it (a directory named by ``hydra.run.dir`` that holds other files
    keeps them)."""
    for name in _HYDRA_FILES:
        path = run_dir / name
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def shown(path: Path) -> Path:
    """``path`` as a user would type it here: relative to the working directory when it is
    below it, else as it is."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        return Path(path)


def safe_name(text: str) -> str:
    """A value fit for a directory name: no path separators, no spaces, short numbers."""
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if len(text) > 8 and not number.is_integer():
            text = f"{number:.4g}"
    return re.sub(r"[/\\\s:,=\[\]{}()'\"]+", "_", text).strip("_") or "_"


def capped_name(text: str, limit: int = 120) -> str:
    """``text`` as it is when it fits ``limit`` characters; else its start, ``~`` and 8 hex
    digits of its hash, so that two long names that share a start stay two folders (a file
    system refuses names over 255 bytes)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9]}~{digest}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync it, rename it over ``path``, fsync the folder:
    a crash at any point leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
