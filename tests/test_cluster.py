"""Sweeps as submitit jobs: the ``hydra/launcher=slurm`` preset and the sbatch file it makes,
``submitit_local`` jobs, a preempted job requeued and resumed in its own directory, and the
torch.distributed variables a job of several tasks gets."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from transferlab.config.store import register_configs
from transferlab.errors import UserError
from transferlab.infra import cluster
from transferlab.run import jobs
from transferlab.run.hooks import StopRequest
from transferlab.run.resume import requeued_action

from .conftest import CONF_DIR, TINY, cli

SLURM_JOB = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_JOB_NUM_NODES": "1"}


@pytest.fixture
def no_job_env(monkeypatch):
    """Neither submitit's nor torch.distributed's variables (as a login node); every one of
    them is as before afterwards, also those that code under test set in os.environ itself
    (submitit's export): a RANK / WORLD_SIZE left behind would make later runs wait for
    processes that never come."""
    for key in [*SLURM_JOB, "SLURM_JOB_NODELIST", "SUBMITIT_PREEMPT_SIGNAL",
                *cluster.DISTRIBUTED_KEYS, "CUDA_VISIBLE_DEVICES"]:
        monkeypatch.setenv(key, "")  # records the key's state before the test (delenv of an
        monkeypatch.delenv(key)      # absent key records nothing to restore)
    return monkeypatch


def compose_launcher(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    return cfg.hydra.launcher


# --- the presets --------------------------------------------------------------------------------


def test_slurm_preset_composes_with_documented_defaults_and_cli_overrides():
    launcher = compose_launcher(["hydra/launcher=slurm"])
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task,
            launcher.mem_gb, launcher.timeout_min, launcher.array_parallelism) == (1, 1, 8, 32,
                                                                                 240, 16)
    assert launcher.partition is None and launcher.account is None
    assert launcher.max_num_timeout > 0  # a job that reaches its time limit is requeued
    assert launcher.submitit_folder.startswith("outputs/sweeps/")  # in the sweep directory
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    launcher = compose_launcher(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.account=lab", "hydra.launcher.gpus_per_node=4",
                                 "hydra.launcher.tasks_per_node=4",
                                 "+hydra.launcher.additional_parameters.constraint=a100"])
    assert (launcher.partition, launcher.account, launcher.gpus_per_node,
            launcher.tasks_per_node) == ("gpu", "lab", 4, 4)
    assert dict(launcher.additional_parameters) == {"constraint": "a100"}


def test_slurm_preset_keys_are_typed():
    with pytest.raises(Exception, match="timeout_min"):
        compose_launcher(["hydra/launcher=slurm", "hydra.launcher.timeout_min=4h"])
    with pytest.raises(Exception, match="gpus_pernode"):
        compose_launcher(["hydra/launcher=slurm", "hydra.launcher.gpus_pernode=2"])


@pytest.mark.parametrize("launcher", ["slurm", "submitit_local", "joblib"])
def test_a_launcher_without_multirun_is_an_error(launcher):
    with pytest.raises(UserError, match=f"hydra/launcher={launcher} launches the jobs of a "
                                        "sweep: add -m"):
        jobs.check_launcher([f"hydra/launcher={launcher}", "seed=1"])
    jobs.check_launcher([f"hydra/launcher={launcher}", "--cfg", "hydra"])  # only prints


# --- inside a job -------------------------------------------------------------------------------


def test_export_submitit_env_sets_torch_distributed_variables(no_job_env):
    assert cluster.export_submitit_env() == {}  # not a submitit job
    for key, value in SLURM_JOB.items():
        no_job_env.setenv(key, value)
    assert cluster.export_submitit_env() == {}  # one task: nothing to set
    no_job_env.setenv("SLURM_NTASKS", "8")
    no_job_env.setenv("SLURM_JOB_NUM_NODES", "2")
    no_job_env.setenv("SLURM_NODEID", "1")
    no_job_env.setenv("SLURM_PROCID", "5")
    no_job_env.setenv("SLURM_LOCALID", "1")
    no_job_env.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    no_job_env.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    exported = cluster.export_submitit_env()
    port = exported.pop("MASTER_PORT")
    assert exported == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}
    assert 20000 <= int(port) <= 60000  # drawn from the job id: every task agrees
    assert {k: os.environ[k] for k in exported} == exported
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # each task picks LOCAL_RANK's GPU
    no_job_env.setenv("RANK", "3")  # a torchrun inside the job: its variables stand
    assert cluster.export_submitit_env() == {} and os.environ["RANK"] == "3"


def test_the_preemption_signal_stops_the_loop_and_wins_over_sigterm(no_job_env):
    assert StopRequest().preemption is None  # not a submitit job: SIGINT / SIGTERM only
    for key, value in SLURM_JOB.items():
        no_job_env.setenv(key, value)
    for first, second in [(signal.SIGTERM, signal.SIGUSR2), (signal.SIGUSR2, signal.SIGTERM)]:
        stop = StopRequest()
        assert stop.preemption == signal.SIGUSR2
        stop._handle(first, None)
        assert stop()
        stop._handle(second, None)
        assert stop.signum == signal.SIGUSR2  # SLURM preempts with SIGTERM, then USR2
    with StopRequest().installed() as stop:
        assert signal.getsignal(signal.SIGUSR2) == stop._handle


def test_hand_over_gives_only_the_preemption_signal_to_submitit(no_job_env):
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        cluster.hand_over(signal.SIGUSR2)  # not a submitit job
        for key, value in SLURM_JOB.items():
            no_job_env.setenv(key, value)
        cluster.hand_over(signal.SIGTERM)
        assert calls == []
        cluster.hand_over(signal.SIGUSR2)
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_requeued_job_goes_on_in_its_own_directory(tmp_path):
    assert requeued_action(tmp_path) is None  # a new job: train
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    # its earlier attempt's record, even one still marked running (killed): not "busy"
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"status": "running", "pid": 1, "host": "elsewhere", "updated_at": time.time()}))
    assert requeued_action(tmp_path) == "resume"
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert requeued_action(tmp_path) == "skip"


# --- real submitit jobs -------------------------------------------------------------------------

# 1000 digits at 32 px, 3 epochs of the whole tiny model (most of a second each on a free
# core): the window to preempt a job between its first checkpoint and its end.
JOB = [*TINY, "dataset.samples_per_class=100", "trainer.epochs=3", "trainer.deterministic=true",
       "freeze=none"]


def _sweep(cwd: Path) -> Path:
    (sweep,) = (cwd / "outputs" / "sweeps").glob("*/*")
    return sweep


def _metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


@pytest.mark.slow
def test_submitit_local_sweep_runs_real_jobs_and_a_preempted_one_resumes(tmp_path):
    """Two jobs of the same config as submitit jobs; job 0 gets submitit's preemption signal
    after its first epoch: it saves, submitit requeues it, it goes on in its own directory and
    ends with job 1's weights, bit for bit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_SWE")}
    env.update(HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab.train", "-m", *JOB, "seed=0,0",
         "hydra/launcher=submitit_local"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        last = tmp_path / "outputs" / "sweeps"
        while not list(last.glob("*/*/0_*/checkpoints/last.pt")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        job0 = next(last.glob("*/*/0_*"))
        first = _metrics(job0)
        assert first["status"] == "running" and len(first["history"]) == 1
        os.kill(first["pid"], signal.SIGUSR2)  # what SLURM sends before preempting
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    sweep = _sweep(tmp_path)
    assert "2 job(s), 0 failed" in out
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name for j in jobs] == ["0_seed-0", "1_seed-0"]  # the usual layout
    for job in jobs:
        assert _metrics(job)["status"] == "completed"
        assert _metrics(job)["pid"] != proc.pid  # run by submitit, in processes of its own
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2  # submitit's own records, out of the way
    log0 = next(p for p in logs if "Requeued job" in p.read_text()).read_text()
    assert "SIGUSR2: checkpoint saved; submitit requeues the job" in log0
    resumed = _metrics(jobs[0])
    assert resumed["pid"] != first["pid"]
    assert len(resumed["resumes"]) == 1 and resumed["resumes"][0]["from_epoch"] >= 1
    assert "resumes" not in _metrics(jobs[1])
    a, b = (torch.load(j / "checkpoints" / "last.pt", weights_only=True)["model"] for j in jobs)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_killed_submitit_job_is_one_failed_row_and_the_other_job_finishes(tmp_path):
    """SIGKILL to job 0 of a submitit_local sweep while job 1 runs: submitit gives up on job 0
    (before: its UncompletedJobError traceback, no table); now job 1 runs to its end,
    job 0 is a failed row saying its process died, the table prints, exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_SWE")}
    env.update(HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab.train", "-m", *JOB, "seed=0,1",
         "hydra/launcher=submitit_local"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        records: list[dict] = []
        while len(records) < 2 or any(r.get("status") != "running" for r in records):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
            records = []
            for path in sorted((tmp_path / "outputs" / "sweeps").glob("*/*/*/metrics.json")):
                try:
                    records.append(json.loads(path.read_text()))
                except ValueError:  # being written
                    pass
        os.kill(records[0]["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    why = f"its process (pid {records[0]['pid']}) died (UncompletedJobError)"
    assert err.splitlines()[0] == f"error: job 0: {why}"
    assert err.splitlines()[-1].startswith("error: the launcher stopped when a process of the "
                                           "sweep died (UncompletedJobError): go on with "
                                           "transferlab-train -m ")
    assert err.splitlines()[-1].endswith(" resume=auto")
    jobs = sorted(p for p in _sweep(tmp_path).iterdir() if p.is_dir() and p.name[0].isdigit())
    assert (_metrics(jobs[0])["status"], _metrics(jobs[0])["error"]) == ("failed", why)
    assert _metrics(jobs[1])["status"] == "completed" and len(_metrics(jobs[1])["history"]) == 3
    assert "2 job(s), 1 failed" in out


# Stand-ins for SLURM's commands: sbatch answers with a job id and runs the array's tasks here
# one after another, in the environment SLURM gives them; srun runs its command; sacct knows
# nothing (submitit then waits for the jobs' result files). submitit keeps the batch file.
FAKE_SBATCH = """#!/bin/bash
echo "Submitted batch job 4242"
last=$(sed -n 's/^#SBATCH --array=0-\\([0-9]*\\).*/\\1/p' "$1")
(for i in $(seq 0 "${last:-0}"); do
   SLURM_JOB_ID=$((4243 + i)) SLURM_ARRAY_JOB_ID=4242 SLURM_ARRAY_TASK_ID=$i SLURM_NTASKS=1 \\
   SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_JOB_NUM_NODES=1 bash "$1"
 done) > "$FAKE_SLURM/jobs.log" 2>&1 < /dev/null &
"""
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do case "$1" in --output|--error) shift 2;; *) shift;; esac; done
exec "$@"
"""
FAKE_SACCT = """#!/bin/bash
echo "JobID|State|NodeList"
"""


@pytest.mark.slow
def test_slurm_sweep_writes_the_sbatch_file_of_the_preset(tmp_path):
    """The whole SLURM path but the cluster: the preset's parameters as #SBATCH lines, one
    job array for the sweep, its tasks as SLURM jobs, the usual output layout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = cli(["-m", *TINY, "dataset.samples_per_class=20", "seed=0,1",
                "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                "hydra.launcher.account=lab", "hydra.launcher.gpus_per_node=2",
                "hydra.launcher.cpus_per_task=4", "hydra.launcher.mem_gb=16",
                "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=1",
                "+hydra.launcher.additional_parameters.constraint=a100"], cwd,
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM=str(tmp_path))
    jobs_log = tmp_path / "jobs.log"
    assert proc.returncode == 0, proc.stderr[-3000:] + (
        jobs_log.read_text()[-3000:] if jobs_log.is_file() else "")
    sweep = _sweep(cwd)
    batch = (sweep / ".submitit" / "4242" / "4242_submission.sh").read_text().splitlines()
    expected = {"#SBATCH --partition=gpu", "#SBATCH --account=lab",
                "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=1",
                "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB", "#SBATCH --time=90",
                "#SBATCH --nodes=1", "#SBATCH --array=0-1%1", "#SBATCH --signal=USR2@120",
                "#SBATCH --constraint=a100", "#SBATCH --job-name=train"}
    assert expected <= set(batch), sorted(set(batch) - expected)
    assert f"#SBATCH --output={sweep.resolve()}/.submitit/%A_%a/%A_%a_0_log.out" in batch
    assert "export SUBMITIT_EXECUTOR=slurm" in batch
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in batch)
    assert "2 job(s), 0 failed" in proc.stdout
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name for j in jobs] == ["0_seed-0", "1_seed-1"]
    assert all(_metrics(j)["status"] == "completed" for j in jobs)
    # submitit's records of the array's jobs (their logs, pickles), next to the job directories
    assert {"4242_0", "4242_1"} <= {p.name for p in (sweep / ".submitit").iterdir()}
    assert (sweep / ".submitit" / "4242_1" / "4242_1_0_result.pkl").is_file()
