"""Run directories that never collide, finished runs that are never written into, and the
``metrics.json`` of a run that failed before its record opened.

``hydra.run.dir`` is ``${transferlab_claim:outputs/runs/<date>/<time>_<name>}``: the resolver
creates the directory atomically (``mkdir`` without ``exist_ok``) and, when another run took
that name in the same second, takes ``<name>-2``, ``<name>-3``... A process resolves it once
(Hydra reads ``hydra.run.dir`` more than once): the claimed path is remembered.

Under torchrun (one run, several processes) rank 0 claims the directory and every process
takes that one (their clocks may name different seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferlab.config import RunConfig, load_config
from transferlab.errors import UserError, error_line
from transferlab.infra.processes import env_rank, launched

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


if not OmegaConf.has_resolver(CLAIM_RESOLVER):
    OmegaConf.register_new_resolver(CLAIM_RESOLVER, claim)


def check_run_dir(argv: list[str]) -> None:
    """``hydra.run.dir=<dir>`` on the command line must not name a run: a finished (or
    running) run is written into only by ``resume=<dir>``."""
    for item in argv:
        key, _, value = item.partition("=")
        if key.lstrip("+") != "hydra.run.dir" or not value:
            continue
        metrics = Path(value).expanduser() / "metrics.json"
        if not metrics.is_file():
            continue
        try:
            status = json.loads(metrics.read_text()).get("status", "?")
        except (OSError, ValueError, AttributeError):
            status = "unreadable"
        raise UserError(f"hydra.run.dir={value} holds a run ({status}): choose another "
                        f"directory, or go on with that run with resume={value}")


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
