"""User-facing errors: one line saying what is wrong and how to fix it."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable

# The exit codes every command shares (transferlab.cli.args.run_main)
EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """A mistake in the user's config, data or environment.

    The command-line entry points print ``error: <message>`` on one line and exit with a
    non-zero code instead of showing a traceback.
    """

    def __str__(self) -> str:  # always a single line
        return " ".join(super().__str__().split())


class Interrupted(BaseException):  # noqa: N818 (as KeyboardInterrupt: not an error)
    """A run stopped by SIGINT / SIGTERM after a checkpoint it can resume from."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Paused(BaseException):  # noqa: N818 (the end of a run's budget: not an error)
    """A run stopped at its pause point (``trainer.pause_after_epoch``) after the epoch's
    checkpoint: it goes on with ``resume=<run dir>``."""

    def __init__(self, epoch: int, total: int):
        super().__init__(epoch, total)
        self.epoch, self.total = epoch, total


def stop_behind(exc: BaseException | None) -> BaseException | None:
    """The Ctrl-C (``KeyboardInterrupt``) or stop (:class:`Interrupted`) behind an exception,
    or None. A second Ctrl-C that lands while an extension module is being imported (matplotlib
    drawing the curves, scipy) reaches Python as that import's error: pybind11 raises
    ``ImportError: initialization failed`` from it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def stops_unwrapped():
    """An error that stands for a stop (:func:`stop_behind`) is raised as that stop: the run
    is ``interrupted``, not ``failed``, and the sweep says how to go on, not that a job
    failed."""
    try:
        yield
    except Exception as exc:
        if (stop := stop_behind(exc)) is None:
            raise
        raise stop from None


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``name`` (for "did you mean" hints)."""
    candidates = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not close:
        close = [c for c in candidates if name.split(".")[0] in c][:n]
    return close


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = nearest(name, candidates)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def error_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
