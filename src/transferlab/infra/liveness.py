"""Is a ``running`` run really running? (No torch here: compare and the sweep summary use it.)

``metrics.json`` records the host, the pid and its start time, and a heartbeat
(``updated_at``, rewritten at every write). A run killed by SIGKILL, or whose machine died,
cannot say so itself: its readers tell it from a live one here.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

DEAD_AFTER_S = 24 * 3600  # a running record of another host untouched this long is dead


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell it from a later
    process that reuses its pid; None where that is not known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def run_status(record: dict) -> str:
    """A record's status as a reader should show it: ``dead`` for a ``running`` record whose
    process is gone (on this host: its pid is not alive, or is another process; on another
    host: no heartbeat for DEAD_AFTER_S), else the recorded status."""
    status = str(record.get("status", "unknown"))
    if status != "running":
        return status
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            return status
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "dead"
        except PermissionError:
            pass
        started = record.get("pid_started")
        if started is not None and process_started(pid) not in (None, started):
            return "dead"  # the pid now belongs to another process
        return status
    updated = record.get("updated_at")
    if isinstance(updated, int | float) and time.time() - updated > DEAD_AFTER_S:
        return "dead"
    return status


