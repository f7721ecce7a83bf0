"""Which process this is, read from torchrun's environment without importing torch: what the
command line needs before a config is checked (a one-line error, ``--help``) and at its end.
The process group itself and its collectives are :mod:`transferlab.infra.distributed`'s.
"""

from __future__ import annotations

import logging
import os
import sys

# torchrun's environment: the number of processes, this one's rank and its rank on its node
WORLD_SIZE, RANK, LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"  # the processes on this node


def launched() -> bool:
    """Whether this process is one of several that ``torchrun`` (or a submitit job of several
    tasks, :func:`~transferlab.infra.cluster.export_submitit_env`) started."""
    try:
        return int(os.environ.get(WORLD_SIZE, "1")) > 1 and RANK in os.environ
    except ValueError:
        return False


def env_rank() -> int:
    """This process's rank among those started together (0 for a process of its own)."""
    try:
        return int(os.environ[RANK]) if launched() else 0
    except ValueError:
        return 0


def rank_tag() -> str:
    """``[rank N] `` before the error lines of a DDP process other than rank 0."""
    rank = env_rank()
    return f"[rank {rank}] " if rank else ""


def resume_command(run_dir: object) -> str:
    """The command that goes on with the run in ``run_dir`` as this process runs it: under
    torchrun, with as many processes (a run resumes with the processes it trained with)."""
    if not launched():
        return f"transferlab-train resume={run_dir}"
    world = int(os.environ[WORLD_SIZE])
    try:
        per_node = int(os.environ.get(LOCAL_WORLD_SIZE, world))
    except ValueError:
        per_node = world
    nodes = f" --nnodes={world // per_node}" if per_node and world != per_node else ""
    return (f"torchrun{nodes} --nproc_per_node={per_node} -m transferlab.train "
            f"resume={run_dir}")


def quiet_logging(rank: int) -> None:
    """A process other than rank 0: warnings and errors only, on stderr, marked with the rank
    (rank 0 alone writes the console, the log file and the record)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def shutdown() -> None:
    """Leave the process group (the end of a ``transferlab-train`` under torchrun). A group
    exists only where torch.distributed was imported: a run that stopped before that (a config
    error) imports nothing here."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def warn_from_signal_handler(logger: logging.Logger, message: str, *args: object) -> None:
    """``logger.warning(message, *args)`` from a signal handler. The handler may have stopped
    this process in the middle of a write to the very stream the log goes to (a progress
    line), and a buffered stream refuses a reentrant call: logging would print a ``--- Logging
    error ---`` traceback instead of the line. A thread of its own writes it, as soon as the
    interrupted write is done (the handler's lock is held until then)."""
    import threading

    threading.Thread(target=logger.warning, args=(message, *args),
                     name="warning-from-a-signal").start()
