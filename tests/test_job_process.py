"""Sweep jobs in processes of their own (:mod:`transferlab.infra.job_process`), in process:
the child's value and exit, the record of a job that died, the sweep's stop mark. The sweeps
themselves (a SIGKILLed job, Ctrl-C) are in tests/test_sweeps.py and tests/test_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from transferlab.infra.job_process import (
    STOP_MARK,
    ChildEnd,
    SweepStop,
    record_end,
    run_in_child,
    running_jobs,
    stop_requested,
)


def _in_a_worker(tmp_path, *bodies) -> list[dict]:
    """Each body through :func:`run_in_child`, in a forked stand-in for a joblib worker (it
    leaves its process group and takes over SIGINT / SIGTERM: not pytest's process)."""
    out = tmp_path / "ends.json"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ends = [run_in_child(body) for body in bodies]
            out.write_text(json.dumps([e.__dict__ for e in ends]))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(out.read_text())


def _killed():
    os.kill(os.getpid(), signal.SIGKILL)


def _fails():
    raise SystemExit(2)


def _interrupted():
    raise KeyboardInterrupt


def test_a_child_returns_its_value_and_a_death_is_its_exit_code(tmp_path):
    ends = _in_a_worker(tmp_path, lambda: 0.75, _killed, _fails, _interrupted, lambda: None)
    assert [(e["code"], e["value"]) for e in ends] == [(0, 0.75), (-9, None), (2, None),
                                                       (130, None), (0, None)]
    assert len({e["pid"] for e in ends}) == 5 and os.getpid() not in {e["pid"] for e in ends}


def test_a_child_gets_the_stop_signals_its_worker_gets(tmp_path):
    def stopped_by_its_worker():
        os.kill(os.getppid(), signal.SIGINT)  # (the sweep's main process sends it so)
        time.sleep(30)

    (end,) = _in_a_worker(tmp_path, stopped_by_its_worker)
    assert end["code"] == 130  # KeyboardInterrupt in the child; the worker went on


def test_a_child_of_a_worker_that_blocks_sigint_gets_it(tmp_path):
    """A Ray worker blocks SIGINT (Ray starts its processes so): its job's child does not."""
    def stopped():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        (end,) = _in_a_worker(tmp_path, stopped)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert end["code"] == 130


def _record(job, **fields):
    (job / "metrics.json").write_text(json.dumps(fields))


def test_the_record_of_a_job_that_died_is_closed(tmp_path):
    _record(tmp_path, status="running", pid=4242, history=[{"epoch": 1}])
    error = record_end(tmp_path, ChildEnd(4242, -signal.SIGKILL))
    assert error == "its process (pid 4242) was killed by SIGKILL"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == {"status": "failed", "pid": 4242, "history": [{"epoch": 1}],
                     "error": error}

    _record(tmp_path, status="running", pid=4242)  # a stop before its first checkpoint
    record_end(tmp_path, ChildEnd(4242, -signal.SIGTERM))
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"

    _record(tmp_path, status="interrupted", pid=4242)  # it closed its own record
    assert record_end(tmp_path, ChildEnd(4242, 130)) is None
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"

    (tmp_path / "metrics.json").unlink()  # it died before its record opened
    assert record_end(tmp_path, ChildEnd(7, 1)) == "its process (pid 7) exited with code 1"
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_a_sweep_stop_is_marked_for_its_launch_and_a_third_ctrl_c_ends_it(tmp_path):
    stop = SweepStop(tmp_path, "host:1:100")
    assert not stop_requested(tmp_path, "host:1:100")
    stop._handle(signal.SIGINT, None)  # (no worker runs a job: nothing to pass on)
    assert stop.signum == signal.SIGINT
    assert (tmp_path / STOP_MARK).read_text() == "host:1:100 SIGINT\n"
    assert stop_requested(tmp_path, "host:1:100")
    assert not stop_requested(tmp_path, "host:9:900")  # another launch's mark
    stop._handle(signal.SIGINT, None)  # passed on: the jobs stop at once; the sweep waits
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    stop.clear()
    assert not (tmp_path / STOP_MARK).exists()


def test_a_sweep_on_remote_workers_signals_its_running_jobs_by_their_records(tmp_path):
    """Ray's workers are not the sweep's children: its stop goes to the pids of the jobs'
    running records on this machine (not to a job that ended, nor to one of another host)."""
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        for name, fields in {"0_a": dict(status="running", pid=job.pid, host=host),
                             "1_b": dict(status="completed", pid=os.getpid(), host=host),
                             "2_c": dict(status="running", pid=1, host="elsewhere"),
                             "x": dict(status="running", pid=job.pid, host=host)}.items():
            (tmp_path / name).mkdir()
            _record(tmp_path / name, **fields)
        assert running_jobs(tmp_path) == [job.pid]
        SweepStop(tmp_path, "host:1:100", remote_workers=True)._handle(signal.SIGTERM, None)
        assert job.wait(timeout=30) == -signal.SIGTERM
    finally:
        job.kill()


def test_a_stop_signal_during_a_write_to_the_log_stream_still_logs_its_line(tmp_path, capsys):
    """A Ctrl-C that arrives while the process writes a line to the stream its log goes to
    (a progress line): the handler's own line follows it, not a ``--- Logging error ---``
    traceback (a buffered stream refuses a reentrant write)."""
    import io
    import logging
    import threading

    from transferlab.infra import job_process

    stop = SweepStop(tmp_path, "host:1:100")

    class Raw(io.FileIO):
        def write(self, data):  # the signal arrives in the middle of this write
            if b"progress" in bytes(data) and stop.signum is None:
                stop._handle(signal.SIGINT, None)
            return super().write(data)

    stream = io.TextIOWrapper(io.BufferedWriter(Raw(tmp_path / "log.txt", "w")),
                              write_through=True)
    handler = logging.StreamHandler(stream)
    job_process.log.addHandler(handler)
    try:
        job_process.log.warning("progress: epoch 1")
        for thread in threading.enumerate():
            if thread.name == "warning-from-a-signal":
                thread.join(timeout=10)
    finally:
        job_process.log.removeHandler(handler)
        stream.close()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines[0] == "progress: epoch 1"
    assert lines[1].startswith("SIGINT: the sweep's jobs finish their step")
    assert "Logging error" not in capsys.readouterr().err
