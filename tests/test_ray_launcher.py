"""hydra/launcher=ray_tasks: a sweep on a local Ray (2 CPUs, started by the sweep) gives, job
for job, the numbers of the same sweep on Hydra's basic launcher, and keeps joblib's
guarantees: a failed job and a killed one are failed rows of the sweep's table (exit 1), a
Ctrl-C saves the running jobs ``interrupted`` and ``resume=auto`` completes them (pip install
'transferlab[ray]')."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import TINY, cli
from .test_sweeps import _start, job_dirs, metrics, sweep_dirs

RAY = importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None


@pytest.mark.slow
@pytest.mark.skipif(not RAY, reason="hydra-ray-launcher is not installed: pip install "
                    "'transferlab[ray]'")
def test_a_ray_sweep_matches_the_basic_launcher_job_for_job(tmp_path):
    sweep = ["-m", *TINY, "dataset.val_fraction=0.25", "seed=0,1", "optimizer.lr=0.01",
             "trainer.feature_cache.mode=off"]  # each job computes its own numbers
    results = {}
    ray = ["hydra/launcher=ray_tasks", "hydra.launcher.ray.init.num_cpus=2"]
    for launcher, extra in (("ray", ray), ("basic", [])):
        cwd = tmp_path / launcher
        cwd.mkdir()
        # Ray runs a job of remote.num_cpus=1 on one thread (it sets OMP_NUM_THREADS): the
        # basic launcher's jobs too, so that their float sums add up in the same order
        proc = cli([*sweep, *extra], cwd, OMP_NUM_THREADS="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 job(s), 0 failed" in proc.stdout
        jobs = sorted(cwd.glob("outputs/sweeps/*/*/*_seed-*"))
        records = [json.loads((job / "metrics.json").read_text()) for job in jobs]
        results[launcher] = {
            job.name: [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in r["history"]]
            for job, r in zip(jobs, records, strict=True)}
        results[launcher + " pids"] = {r["pid"] for r in records}
    assert list(results["ray"]) == ["0_seed-0", "1_seed-1"]
    assert results["ray"] == results["basic"]
    assert results["ray"]["0_seed-0"] != results["ray"]["1_seed-1"]  # the seeds differ
    assert len(results["ray pids"]) == 2  # two Ray workers, one job each


@pytest.mark.slow  # a process of its own (Hydra composes the launcher in its multirun)
@pytest.mark.skipif(RAY, reason="the plugin is installed")
def test_without_the_plugin_the_preset_is_one_line_naming_the_extra(tmp_path):
    proc = cli(["-m", "hydra/launcher=ray_tasks", "seed=0,1"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: hydra/launcher=ray_tasks needs a Hydra plugin that is not installed "
        "(hydra/launcher/ray could not be loaded): pip install 'transferlab[ray]'"]


# as test_sweeps.PARALLEL: time to signal the jobs while two run (each on one CPU of the Ray)
RAY_PARALLEL = [*TINY, "dataset.val_fraction=0.25", "dataset.samples_per_class=100",
                "trainer.epochs=3", "freeze=none", "hydra/launcher=ray_tasks",
                "hydra.launcher.ray.init.num_cpus=2", "optimizer.lr=0.01,-1,0.02"]


def _wait_until(proc: subprocess.Popen, cwd: Path, jobs: dict[str, tuple[str, int]]) -> dict:
    """The records of the sweep's jobs named in ``jobs`` (the start of their directory's name:
    (status, epochs done at least, their checkpoint saved)), once each says so."""
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the jobs did not get there"
        found = {}
        for path in (cwd / "outputs" / "sweeps").glob("*/*/*/metrics.json"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                start = path.parent.name.partition("_")[0] + "_"
                status, epochs = jobs.get(start, (None, 0))
                if record.get("status") == status and len(record.get("history", [])) >= epochs \
                        and (not epochs or (path.parent / "checkpoints" / "last.pt").is_file()):
                    found[start] = record
        if len(found) == len(jobs):
            return found
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not RAY, reason="hydra-ray-launcher is not installed: pip install "
                    "'transferlab[ray]'")
def test_a_ray_sweep_keeps_joblibs_guarantees_failed_killed_ctrl_c_resume_auto(tmp_path):
    """joblib's guarantees (tests/test_sweeps.py) on a local Ray of 2 CPUs, 3 jobs: job 1
    fails (lr -1) and the Ray starts job 2 in its place; job 0, SIGKILLed (its pid from its
    running record), is a failed row saying how it died; Ctrl-C (SIGINT to the process group)
    then reaches job 2 once: it saves a checkpoint and ends ``interrupted``, and the sweep
    ends with one line saying how to go on, exit 130. ``resume=auto`` goes on with jobs 0
    and 2 from their checkpoints and completes them; job 1 fails again: its table, exit 1."""
    args = ["-m", *RAY_PARALLEL]
    proc = _start(args, tmp_path, start_new_session=True)
    try:
        first = _wait_until(proc, tmp_path, {"0_": ("running", 1), "2_": ("running", 1)})["0_"]
        os.kill(first["pid"], signal.SIGKILL)
        _wait_until(proc, tmp_path, {"0_": ("failed", 0), "2_": ("running", 1)})
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()][-1] == (
        f"interrupted (SIGINT): go on with transferlab-train -m {shlex.join(args[1:])} "
        "resume=auto")
    assert "Sweep " not in out  # no table: the sweep did not end
    (sweep,) = sweep_dirs(tmp_path)
    killed, failed, stopped = job_dirs(sweep)
    why = f"its process (pid {first['pid']}) was killed by SIGKILL"
    assert (metrics(killed)["status"], metrics(killed)["error"]) == ("failed", why)
    assert (killed / "checkpoints" / "last.pt").is_file()
    # what the jobs' workers print comes through Ray, after "(_run_job pid=<worker>)"
    assert any(line.endswith(f" error: job 0: {why}") for line in err.splitlines()), err
    lr = "optimizer.lr must be > 0, got -1.0"
    assert (metrics(failed)["status"], metrics(failed)["error"]) == ("failed", lr)
    # "signal 2": one SIGINT (a second would have stopped the job at once, unsaved)
    assert (metrics(stopped)["status"], metrics(stopped)["error"]) == ("interrupted", "signal 2")
    assert (stopped / "checkpoints" / "last.pt").is_file()
    assert not (sweep / ".transferlab_stop").exists()

    again = cli([*args, "resume=auto"], tmp_path, OMP_NUM_THREADS="1")
    assert again.returncode == 1, again.stderr[-3000:]
    assert "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "3 job(s), 1 failed" in again.stdout
    for job in (killed, stopped):
        assert metrics(job)["status"] == "completed" and len(metrics(job)["history"]) == 3
        assert len(metrics(job)["resumes"]) == 1
    assert (metrics(failed)["status"], metrics(failed)["error"]) == ("failed", lr)


@pytest.mark.skipif(not RAY, reason="hydra-ray-launcher is not installed")
def test_the_ray_launcher_keeps_the_sweeps_stop_handlers(monkeypatch):
    """``ray.init`` sets its own SIGTERM handler (``sys.exit``) in the process that starts
    Ray: the sweep's (SweepStop's, installed before) are put back before the jobs launch."""
    from hydra_plugins.hydra_ray_launcher import _launcher_util, ray_launcher
    from omegaconf import OmegaConf

    from hydra_plugins.transferlab_ray.ray_tasks_launcher import RayTasksLauncher

    def start_ray(init):  # as ray.init does
        seen["init"] = dict(init)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def launch(self, job_overrides, initial_job_idx):
        seen["at launch"] = signal.getsignal(signal.SIGTERM)
        return []

    seen = {}
    monkeypatch.setattr(_launcher_util, "start_ray", start_ray)
    monkeypatch.setattr(ray_launcher.RayLauncher, "launch", launch)
    ours = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        cfg = OmegaConf.create({"init": {"address": None, "num_cpus": 2}, "remote": {}})
        assert RayTasksLauncher(cfg).launch([["seed=0"]], 0) == []
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen["at launch"] is ours
    assert seen["init"] == {"address": None, "num_cpus": 2, "object_store_memory": 78643200}
