"""One run, end to end: config -> build (:mod:`.build`) -> the task's loop (:mod:`.tasks`) ->
records and artifacts (``metrics.json``, TensorBoard, checkpoints, learning curves).

:func:`train` (:mod:`.execute`) is the plain function behind ``transferlab-train``: it takes a
composed config (or a :class:`~transferlab.config.RunConfig`) and returns the metrics and what
it built, so tests and notebooks can call it; :func:`resume_run` goes on with a saved run.

Importing this package imports no torch (a config is checked against its task's rules,
:mod:`.tasks`, before anything is built); ``train``, ``resume_run`` and ``RunResult`` are
imported from :mod:`.execute` when first named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferlab.run.execute import RunResult, resume_run, train

__all__ = ["RunResult", "resume_run", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from transferlab.run import execute

        return getattr(execute, name)
    raise AttributeError(f"module 'transferlab.run' has no attribute {name!r}")
