"""Sweeps through the real CLI (multirun, joblib, Optuna), their HParams records, and
``transferlab-compare`` on the results."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from transferlab.cli import compare as compare_cli
from transferlab.tools.sweep import job_name, sweep_name, swept_keys

from .conftest import TINY, cli

# A sweep's jobs: the tiny model on a quarter of digits held out (fast, and accuracy separates
# the learning rates).
pytestmark = pytest.mark.slow  # whole sweeps, through the console script

SWEEP = [*TINY, "dataset.val_fraction=0.25"]


def sweep_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "sweeps").glob("*/*"))


def job_dirs(sweep: Path) -> list[Path]:
    """The numbered job directories (the sweep root also holds seed_groups/ and dotfiles)."""
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()),
                  key=lambda p: int(p.name.partition("_")[0]))


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def hparams_of(job: Path) -> dict:
    """The HParams session-start record of a job, read with TensorBoard's own event reader."""
    acc = EventAccumulator(str(job / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    starts = [plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
              for tag, raw in content.items() if tag.endswith("session_start_info")]
    assert len(starts) == 1, sorted(content)
    out = {}
    for key, value in starts[0].hparams.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind)
    return out


def scalar(job: Path, tag: str) -> float:
    acc = EventAccumulator(str(job / "tb"))
    acc.Reload()
    return acc.Scalars(tag)[-1].value


def run_compare(capsys, *argv: str) -> list[str]:
    assert compare_cli.main([*argv]) == 0
    return capsys.readouterr().out.strip().splitlines()


# --- the 4-job sweep -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_job_sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("sweep4")
    proc = cli(["-m", *SWEEP, "freeze=linear_probe,none", "optimizer.lr=1e-3,1e-2"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(cwd)
    assert "job(s), 0 failed" in proc.stdout  # the summary printed when the sweep ends
    return sweep


def test_sweep_runs_every_combination_in_readably_named_jobs(four_job_sweep):
    assert four_job_sweep.name.endswith("_sweep-freeze__optimizer.lr")
    names = [p.name for p in job_dirs(four_job_sweep)]
    # only what the sweep varies names a job, not the fixed overrides (backbone=..., ...)
    assert names == ["0_freeze-linear_probe__optimizer.lr-0.001",
                     "1_freeze-linear_probe__optimizer.lr-0.01",
                     "2_freeze-none__optimizer.lr-0.001", "3_freeze-none__optimizer.lr-0.01"]
    for job in job_dirs(four_job_sweep):
        assert metrics(job)["status"] == "completed"
        assert (job / "checkpoints" / "best.pt").is_file()


def test_every_job_records_its_hparams_and_metrics_in_tensorboard(four_job_sweep):
    expected = [("linear_probe", 0.001), ("linear_probe", 0.01), ("none", 0.001), ("none", 0.01)]
    for job, (freeze, lr) in zip(job_dirs(four_job_sweep), expected, strict=True):
        hp = hparams_of(job)
        assert hp["freeze"] == freeze and hp["optimizer.lr"] == pytest.approx(lr)
        assert hp["backbone"] == "test_efficientnet" and hp["dataset"] == "digits"
        assert hp["backbone.name"] == "test_efficientnet"  # an overridden field
        assert hp["dataset.val_fraction"] == pytest.approx(0.25)
        assert hp["seed"] == 0
        m = metrics(job)
        assert scalar(job, "hparam/best_val_acc") == pytest.approx(m["best"]["val_acc"])
        assert scalar(job, "hparam/final_val_loss") == pytest.approx(m["final"]["val_loss"])


def test_compare_lists_the_jobs_best_first(four_job_sweep, capsys):
    lines = run_compare(capsys, str(four_job_sweep), "plot=false")
    rows = lines[2:lines.index("")]  # the table; the paired statistics below it
    assert len(rows) == 4
    accs = {job.name.partition("_")[0]: metrics(job)["best"]["val_acc"]
            for job in job_dirs(four_job_sweep)}
    order = sorted(accs, key=lambda k: -accs[k])
    assert [r.split()[0] for r in rows] == order
    assert lines[0].split()[:3] == ["run", "overrides", "status"]
    for row in rows:
        assert "completed" in row and "freeze=" in row and "optimizer.lr=" in row
        assert "backbone=" not in row  # fixed across the sweep: not a column of differences


def test_compare_sorts_by_loss_and_writes_markdown_csv_and_a_figure(four_job_sweep, capsys,
                                                                   tmp_path):
    lines = run_compare(capsys, str(four_job_sweep), "sort=final_val_loss", "format=markdown",
                        f"plot={tmp_path / 'curves.png'}", "tensorboard=true")
    assert lines[0].startswith("| run | overrides | status |") and lines[1].startswith("|---")
    losses = [metrics(j)["final"]["val_loss"] for j in job_dirs(four_job_sweep)]
    column = [c.strip() for c in lines[0].split("|")].index("final val loss")
    shown = [float(r.split("|")[column]) for r in lines[2:6]]
    assert shown == sorted(round(x, 4) for x in losses)
    assert lines[-1] == f"tensorboard --logdir {four_job_sweep}"
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    rows = list(csv.DictReader(io.StringIO("\n".join(run_compare(capsys, str(four_job_sweep),
                                                                  "format=csv")))))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    by_path = {Path(r["run"]).name: r for r in rows}
    for job in job_dirs(four_job_sweep):
        assert float(by_path[job.name]["best_val_acc"]) == pytest.approx(
            metrics(job)["best"]["val_acc"], abs=1e-5)


# --- failures, parallel jobs, Optuna -------------------------------------------------------------


def test_a_failing_job_does_not_lose_the_others(tmp_path, capsys):
    proc = cli(["-m", *SWEEP, "optimizer.lr=1e-3,-1,3e-3,1e-2"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the sweep finished, one job failed
    assert "Traceback" not in proc.stderr
    (sweep,) = sweep_dirs(tmp_path)
    statuses = {j.name: metrics(j)["status"] for j in job_dirs(sweep)}
    assert statuses == {"0_optimizer.lr-0.001": "completed", "1_optimizer.lr--1": "failed",
                        "2_optimizer.lr-0.003": "completed", "3_optimizer.lr-0.01": "completed"}
    assert metrics(sweep / "1_optimizer.lr--1")["error"] == "optimizer.lr must be > 0, got -1.0"
    assert "4 job(s), 1 failed" in proc.stdout

    assert compare_cli.main([str(sweep), "plot=false"]) == 0  # failed runs hidden by default
    out, err = capsys.readouterr()
    rows = out.split("\n\n")[0].splitlines()[2:]  # the table; the statistics below it
    assert len(rows) == 3 and all("completed" in r for r in rows)
    assert "(1 failed run(s) hidden: all=true shows them)" in err
    rows = run_compare(capsys, str(sweep), "plot=false", "all=true")[2:6]
    assert len(rows) == 4
    assert sum("completed" in r for r in rows) == 3
    assert "failed: optimizer.lr must be > 0" in rows[-1]  # no metric: listed last


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    proc = cli(["-m", *SWEEP, "trainer.epochs=2", "seed=0,1", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["0_seed-0", "1_seed-1"]
    pids = {metrics(j)["pid"] for j in jobs}
    assert len(pids) == 2  # two worker processes, one job each
    assert all(metrics(j)["status"] == "completed" for j in jobs)


def test_optuna_search_preset_optimises_the_returned_accuracy(tmp_path):
    proc = cli(["-m", *SWEEP, "hparams_search=optuna_lr_freeze", "hydra.sweeper.n_trials=2",
                "hydra.sweeper.params.freeze='choice(linear_probe,none)'"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    best = max(metrics(j)["best"]["val_acc"] for j in jobs)
    # Optuna's report: the best value is the best val accuracy a job returned
    result = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {best}" in result
    for job in jobs:
        assert "optimizer.lr-" in job.name and "freeze-" in job.name


# --- names and tables, without running anything --------------------------------------------------


def test_swept_keys_come_from_the_command_line():
    argv = ["-m", "backbone=resnet18,efficientnet_lite0", "optimizer.lr=1e-3", "seed=range(3)",
            "+extra=choice(1,2)", "dataset.root=/data/x", "hydra/launcher=joblib"]
    assert swept_keys(argv) == ["backbone", "seed", "extra"]


def test_job_names_hold_the_swept_values_only(monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_SWEPT_KEYS", "optimizer.lr,dataset.root")
    task = ["backbone=resnet18", "optimizer.lr=0.0011205837185064174", "dataset.root=/data/a b",
            "name=x", "hydra.launcher.n_jobs=2"]
    assert job_name(4, task) == "4_optimizer.lr-0.001121__dataset.root-data_a_b"
    monkeypatch.setenv("TRANSFERLAB_SWEPT_KEYS", "")
    assert job_name(0, ["seed=3", "name=x"]) == "0_seed-3"  # nothing swept: every override
    assert job_name(1, []) == "1"
    monkeypatch.setenv("TRANSFERLAB_NAME_GIVEN", "")
    assert sweep_name("digits-x-y", ["freeze", "optimizer.lr"]) == "sweep-freeze__optimizer.lr"
    assert sweep_name("digits-x-y", []) == "digits-x-y"
    monkeypatch.setenv("TRANSFERLAB_NAME_GIVEN", "1")
    assert sweep_name("study/1", ["freeze"]) == "study_1"


def _fake_run(root: Path, name: str, overrides: list[str], status: str = "completed",
              acc: float | None = None, loss: float = 0.5, epochs: int = 3) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    history = [{"epoch": e, "stage": "head" if e < 3 else "finetune", "train_loss": 1.0,
                "train_acc": 0.5, "val_loss": loss, "val_acc": acc or 0.0, "lr": {},
                "seconds": 1.0} for e in range(1, epochs + 1)]
    data = {"status": status, "history": history if acc is not None else [],
            "best": {"epoch": epochs, "val_acc": acc, "val_loss": loss} if acc else None,
            "final": {"epoch": epochs, "val_acc": acc, "val_loss": loss} if acc else None,
            "params": {"total": 100, "trainable": 10}, "wall_seconds": 12.0}
    (job / "metrics.json").write_text(json.dumps(data))
    return job


def test_group_seeds_gives_mean_and_std(tmp_path, capsys):
    for i, (seed, acc) in enumerate([(0, 0.90), (1, 0.92), (2, 0.94)]):
        _fake_run(tmp_path, f"{i}_a", ["freeze=two_stage", f"seed={seed}"], acc=acc)
    for i, (seed, acc) in enumerate([(0, 0.80), (1, 0.84)]):
        _fake_run(tmp_path, f"{3 + i}_b", ["freeze=linear_probe", f"seed={seed}"], acc=acc)
    _fake_run(tmp_path, "5_b", ["freeze=linear_probe", "seed=2"], status="running", acc=0.7)
    (tmp_path / "6_c" / ".hydra").mkdir(parents=True)  # started, no metrics.json yet
    (tmp_path / "6_c" / ".hydra" / "overrides.yaml").write_text("- freeze=none\n- seed=0\n")

    lines = run_compare(capsys, str(tmp_path), "group_seeds=true", "plot=false")
    assert "runs" in lines[0].split()
    two, probe, pending = lines[2:]
    assert "freeze=two_stage" in two and "seed=0,1,2" in two
    assert "0.9200 ± 0.0200" in two and " 3 " in two
    assert "freeze=linear_probe" in probe and "2 completed, 1 running" in probe
    assert "0.7800 ± 0.0721" in probe
    assert "freeze=none" in pending and "pending" in pending


def test_compare_reverse_and_where_the_figure_goes(tmp_path, capsys):
    for name, acc in [("0_a", 0.9), ("1_b", 0.7), ("2_c", 0.8)]:
        _fake_run(tmp_path, name, [f"x={name}"], acc=acc)
    default_figure = tmp_path / "compare_val_acc.png"
    assert [r.split()[0] for r in run_compare(capsys, str(tmp_path))[2:]] == ["0", "2", "1"]
    assert default_figure.is_file()  # by default: into the directory compared
    default_figure.unlink()
    lines = run_compare(capsys, str(tmp_path), "reverse=yes", "plot=0")
    assert [r.split()[0] for r in lines[2:]] == ["1", "2", "0"]
    run_compare(capsys, str(tmp_path), "format=csv")  # a CSV: no figure unless asked
    assert not default_figure.exists()
    run_compare(capsys, str(tmp_path), "format=csv", "plot=true")
    assert default_figure.is_file()


def test_compare_reads_outputs_by_default(tmp_path, capsys, monkeypatch):
    _fake_run(tmp_path / "outputs" / "runs", "a", ["seed=1"], acc=0.5)
    monkeypatch.chdir(tmp_path)
    (row,) = run_compare(capsys, "plot=false")[2:]
    assert "completed" in row and "0.5000" in row


def test_compare_errors_are_one_line(tmp_path, capsys):
    assert compare_cli.main([str(tmp_path / "nope")]) == 2
    assert compare_cli.main([str(tmp_path)]) == 2
    assert compare_cli.main([str(tmp_path), "--no-plot"]) == 2
    assert compare_cli.main([str(tmp_path), "--sort", "final_val_loss"]) == 2
    assert compare_cli.main([str(tmp_path), "sort=val_loss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)
    assert err[2] == "error: --no-plot is not an option: write plot=false"
    assert err[3] == "error: --sort is not an option: write sort=<value>"
    assert "invalid value for sort: 'val_loss'" in err[4] and "final_val_loss" in err[4]


# --- sweeps never write into each other ---------------------------------------------------------


def test_two_sweeps_of_one_name_started_together_get_a_directory_each(tmp_path):
    """The same ``-m name=dupsw`` twice in the same second: two claimed directories
    (``<time>_dupsw`` and ``<time>_dupsw-2``), every job of both completed in its own."""
    import concurrent.futures

    argv = ["-m", *SWEEP, "name=dupsw", "seed=0,1",
            "hydra.sweep.dir=${transferlab_claim_sweep:outputs/sweeps/same/dupsw}"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: cli(argv, tmp_path), range(2)))
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    sweeps = sweep_dirs(tmp_path)
    assert [s.name for s in sweeps] == ["dupsw", "dupsw-2"]
    for sweep in sweeps:
        jobs = job_dirs(sweep)
        assert [metrics(j)["status"] for j in jobs] == ["completed", "completed"]
        marks = {(j / ".transferlab_job").read_text().split()[0] for j in jobs}
        assert len(marks) == 1  # the jobs of one launch
    said = {p.stdout.strip().splitlines()[-1].split()[-1] for p in procs}
    assert said == {"outputs/sweeps/same/dupsw", "outputs/sweeps/same/dupsw-2"}


def _finished_sweep(root: Path) -> Path:
    sweep = root / "outputs" / "sweeps" / "mine"
    for job in ("0_seed-0", "1_seed-1"):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "metrics.json").write_text(json.dumps({"status": "completed"}))
    return sweep


@pytest.mark.parametrize(("argv", "line"), [
    (["hydra.sweep.dir=outputs/sweeps/mine"],
     "error: hydra.sweep.dir=outputs/sweeps/mine holds a sweep (2 job(s)): choose another "
     "directory, or go on with that sweep with resume=auto"),
    (["hydra.sweep.subdir=same"],
     "error: hydra.sweep.subdir=same gives every job of the sweep the same directory: name "
     "each job apart, e.g. hydra.sweep.subdir='${hydra.job.num}_my_name'"),
])
def test_a_sweep_is_never_launched_into_another_or_into_one_folder(argv, line, tmp_path):
    """Refused before Hydra starts (nothing is written; torch is not even imported)."""
    sweep = _finished_sweep(tmp_path)
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    proc = cli(["-m", *SWEEP, "seed=0,1", *argv], tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [line], proc.stderr
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before
    assert [p.name for p in sweep.parent.iterdir()] == ["mine"]  # no sweep made beside it


def test_a_job_directory_held_by_another_sweep_is_refused(tmp_path):
    from transferlab.errors import UserError
    from transferlab.infra.run_dirs import claim_job_dir

    job = tmp_path / "0_seed-0"
    claim_job_dir(job, "host:1:100", 0)
    claim_job_dir(job, "host:1:100", 0)  # the same job again (a requeued submitit job)
    with pytest.raises(UserError, match=r"job 0: .* is the directory of another job "
                                        r"\(host:1:100 0\)"):
        claim_job_dir(job, "host:9:900", 0)  # another sweep launched into the same folder
    with pytest.raises(UserError, match="another job"):
        claim_job_dir(job, "host:1:100", 1)  # another job of the same sweep


def test_an_interpolated_run_dir_that_holds_a_run_is_refused(tmp_path):
    """``hydra.run.dir=outputs/fixed/${name}``: the guard reads the directory the run would
    write into, not the text."""
    done = tmp_path / "outputs" / "fixed" / "digits-test_efficientnet-linear_probe"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"status": "completed"}))
    proc = cli([*TINY, "hydra.run.dir=outputs/fixed/${name}"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: hydra.run.dir=outputs/fixed/{done.name} holds a run (completed): choose another "
        f"directory, or go on with that run with resume=outputs/fixed/{done.name}"]
    assert json.loads((done / "metrics.json").read_text()) == {"status": "completed"}


# --- a job's death, a Ctrl-C: the sweep is not lost -----------------------------------------------

# 1000 digits, 3 epochs of the whole tiny model (seconds each on a shared core): time to signal
# the jobs while both run. The joblib launcher runs each job in a child of its worker.
PARALLEL = [*SWEEP, "dataset.samples_per_class=100", "trainer.epochs=3", "freeze=none",
            "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def _start(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """``transferlab-train <args>`` started in a subprocess (as :func:`cli` runs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_SWE")}
    env.update(HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "transferlab.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_until_both_jobs_run(proc: subprocess.Popen, cwd: Path, epochs: int,
                              jobs: int = 2) -> list[dict]:
    """The records of the sweep's two jobs (or ``jobs``) once they are running with
    ``epochs`` done."""
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the jobs did not start"
        records = []
        for path in sorted((cwd / "outputs" / "sweeps").glob("*/*/*/metrics.json")):
            with contextlib.suppress(OSError, ValueError):
                records.append(json.loads(path.read_text()))
        if len(records) == jobs and all(r.get("status") == "running"
                                     and len(r.get("history", [])) >= epochs for r in records):
            return records
        time.sleep(0.05)


def test_a_killed_job_is_one_failed_row_and_the_other_jobs_finish(tmp_path):
    """SIGKILL to one job of a joblib sweep (its pid from its running record): that job is a
    failed row saying how it ended, the other job completes, the summary prints, exit 1
    (before: loky's TerminatedWorkerError, 59 lines, no summary, both jobs left running)."""
    proc = _start(["-m", *PARALLEL], tmp_path)
    try:
        first, _ = _wait_until_both_jobs_run(proc, tmp_path, 0)
        os.kill(first["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "TerminatedWorkerError" not in err
    (sweep,) = sweep_dirs(tmp_path)
    killed, other = job_dirs(sweep)
    why = f"its process (pid {first['pid']}) was killed by SIGKILL"
    assert metrics(killed)["status"] == "failed" and metrics(killed)["error"] == why
    assert f"error: job 0: {why}" in err.splitlines()
    assert metrics(other)["status"] == "completed" and len(metrics(other)["history"]) == 3
    assert "2 job(s), 1 failed" in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith(("0 ", "1 "))] \
        == [["1", "seed=1", "completed"], ["0", "seed=0", "failed:"]]


@pytest.mark.parametrize("to", ["main", "group"])
def test_ctrl_c_stops_a_joblib_sweep_with_checkpoints_and_resume_auto_finishes_it(to, tmp_path):
    """SIGINT to the sweep's main process (``kill -INT``) or to its process group (Ctrl-C in a
    terminal) while both jobs run: each job gets it once, saves a checkpoint and ends
    ``interrupted``; one line says how to go on, exit 130 (before: the workers were killed,
    both jobs left ``running``). ``resume=auto`` then completes both."""
    proc = _start(["-m", *PARALLEL], tmp_path, start_new_session=True)
    try:
        _wait_until_both_jobs_run(proc, tmp_path, 1)
        if to == "main":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1] == (
        f"interrupted (SIGINT): go on with transferlab-train -m {shlex.join(PARALLEL)} "
        "resume=auto")
    assert "Sweep " not in out  # no table: the sweep did not end
    (sweep,) = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    for job in jobs:
        # "signal 2": one SIGINT (a second would have stopped the job at once, unsaved)
        assert (metrics(job)["status"], metrics(job)["error"]) == ("interrupted", "signal 2")
        assert (job / "checkpoints" / "last.pt").is_file()
    assert not (sweep / ".transferlab_stop").exists()

    again = cli(["-m", *PARALLEL, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 job(s), 0 failed" in again.stdout
    for job in jobs:
        assert metrics(job)["status"] == "completed" and len(metrics(job)["history"]) == 3
        assert len(metrics(job)["resumes"]) == 1


def test_a_second_ctrl_c_stops_the_jobs_at_once_and_they_still_end_interrupted(tmp_path):
    """Two Ctrl-C in a row: the jobs stop at once (whether or not they saved), each record
    says ``interrupted`` (none left ``running``), and the sweep's one line, exit 130."""
    proc = _start(["-m", *PARALLEL], tmp_path, start_new_session=True)
    try:
        _wait_until_both_jobs_run(proc, tmp_path, 1)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()] == [
        f"interrupted (SIGINT): go on with transferlab-train -m {shlex.join(PARALLEL)} "
        "resume=auto"]
    assert "SIGINT again: the sweep's jobs stop at once" in out
    (sweep,) = sweep_dirs(tmp_path)
    assert [metrics(job)["status"] for job in job_dirs(sweep)] == ["interrupted"] * 2


def test_sigterm_to_the_whole_group_stops_the_sweep_with_the_job_saved(tmp_path):
    """``timeout``, SLURM's ``scancel`` and container stops send SIGTERM to every process of
    the group, loader processes included. The job finishes its step, saves its checkpoint and
    ends ``interrupted``; the sweep stops before its next job, exit 143 (before: torch's
    loader processes died at once, their death raised in the middle of the job's checkpoint,
    the job failed and the sweep went on to the next one)."""
    args = ["-m", *SWEEP, "dataset.samples_per_class=100", "trainer.epochs=3", "freeze=none",
            "trainer.num_workers=1", "seed=0,1"]
    proc = _start(args, tmp_path, start_new_session=True)
    try:
        _wait_until_both_jobs_run(proc, tmp_path, 1, jobs=1)  # (the basic launcher: one job)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()][-1] == (
        f"interrupted (SIGTERM): go on with transferlab-train {shlex.join(args)} resume=auto")
    (sweep,) = sweep_dirs(tmp_path)
    (job,) = job_dirs(sweep)  # the second job was not started
    assert metrics(job)["status"] == "interrupted", metrics(job).get("error")
    assert (job / "checkpoints" / "last.pt").is_file()
