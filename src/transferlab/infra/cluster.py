"""Sweep jobs run by submitit (``hydra/launcher=slurm`` or ``submitit_local``): what a job reads
of its submitit environment, and how it hands a preemption back to submitit.

Inside a submitit job, submitit catches its preemption signal (``USR2``; SLURM sends it
``signal_delay_s`` before the time limit and, where the cluster is set up so, on preemption).
The training loop takes that signal as it takes SIGTERM: it finishes the step and writes
``checkpoints/last.pt``; then :func:`hand_over` gives the signal to submitit's own handler, which
requeues the job (the hydra launcher's ``checkpoint`` resubmits the same job) and exits. The
job starts again in the same job directory and goes on from that checkpoint (``train``).

Nothing here imports submitit outside a submitit job.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

log = logging.getLogger("transferlab")

# Set by submitit in every job it starts (``slurm`` or ``local``).
EXECUTOR_ENV = "SUBMITIT_EXECUTOR"
DISTRIBUTED_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")


def job_environment() -> Any | None:
    """submitit's ``JobEnvironment`` of the job this process runs in; None outside one."""
    if not os.environ.get(EXECUTOR_ENV):
        return None
    try:
        import submitit
    except ImportError:
        return None
    return submitit.JobEnvironment()


def preemption_signal() -> int | None:
    """The signal submitit checkpoints and requeues its job on (``USR2`` unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise), inside a submitit job; else None."""
    env = job_environment()
    return None if env is None else int(env._usr_sig())


def hand_over(signum: int) -> None:
    """A submitit job that stopped on its preemption signal (after its checkpoint): call
    submitit's handler for that signal, which requeues the job and exits (on another rank
    than 0 it returns). Does nothing for any other signal or outside a submitit job."""
    if signum != preemption_signal():
        return
    handler = signal.getsignal(signum)
    if not callable(handler):  # not submitit's: nobody asked for a requeue
        return
    log.info("%s: checkpoint saved; submitit requeues the job, which then goes on from it",
             signal.Signals(signum).name)
    handler(signum, None)


def export_submitit_env() -> dict[str, str]:
    """In a submitit job of more than one task (``hydra.launcher.tasks_per_node`` > 1, or
    several nodes): set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` from it, as torchrun would, so that
    ``torch.distributed`` starts with ``init_method="env://"``. Every task keeps seeing all
    the node's GPUs (it picks ``LOCAL_RANK``'s, as under torchrun). Returns what it set:
    nothing outside submitit, for one task, or where the variables are already set (a
    torchrun inside the job)."""
    env = job_environment()
    if env is None or env.num_tasks <= 1 or "RANK" in os.environ:
        return {}
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return {key: os.environ[key] for key in DISTRIBUTED_KEYS}
