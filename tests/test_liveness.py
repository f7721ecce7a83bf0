"""Telling a dead run from a live one, and records that are not ours."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from transferlab.infra.liveness import DEAD_AFTER_S, process_started, run_status
from transferlab.tools.compare import find_runs, format_table, read_run

HERE = socket.gethostname()


def record(**fields) -> dict:
    return {"status": "running", "host": HERE, "history": [], **fields}


def test_a_running_record_of_a_gone_process_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is free now
    assert run_status(record(pid=child.pid)) == "dead"


def test_a_running_record_of_a_live_process_is_running():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = record(pid=child.pid, pid_started=process_started(child.pid))
        assert run_status(live) == "running"
        assert run_status({**live, "pid_started": live["pid_started"] + 1}) == "dead"  # reused
    finally:
        child.kill()
        child.wait()


def test_another_hosts_run_is_dead_only_without_a_heartbeat():
    fresh = record(host="elsewhere", pid=1, updated_at=time.time())
    assert run_status(fresh) == "running"
    stale = {**fresh, "updated_at": time.time() - DEAD_AFTER_S - 1}
    assert run_status(stale) == "dead"
    assert run_status({**fresh, "status": "completed"}) == "completed"


def test_compare_shows_a_foreign_metrics_json_as_unreadable_and_keeps_the_others(tmp_path):
    for name, data in (("ours", {"status": "completed", "history": [], "best": None,
                                 "final": None, "params": {}, "wall_seconds": 1.0,
                                 "pid": os.getpid(), "host": HERE}),
                       ("a_list", [1, 2, 3]),
                       ("other_tool", {"loss": 0.3, "epochs": 5}),
                       ("bad_history", {"status": "completed", "history": [1, 2]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(data))
    runs = {r.path.name: r for r in find_runs([tmp_path])}
    assert runs["ours"].status == "completed"
    for name in ("a_list", "other_tool", "bad_history"):
        assert runs[name].status == "unreadable", name
        assert "not a transferlab record" in runs[name].error
    assert "unreadable" in format_table(list(runs.values()), "table", root=tmp_path)
    assert read_run(tmp_path / "ours").status == "completed"
