"""Never lose a run: real processes, real signals, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transferlab.errors import UserError
from transferlab.infra.checkpoint import FORMAT
from transferlab.run import resume_run, train
from transferlab.run.resume import same_config
from transferlab.tools.compare import read_run

from .conftest import compose_train

# The tiny random timm model on digits (1437 training images at 32 px: about a second an
# epoch), deterministic, no loader processes.
BASE = ["backbone=timm", "backbone.name=test_efficientnet", "backbone.pretrained=false",
        "dataset.image_size=32", "trainer.num_workers=0", "trainer.progress=false",
        "trainer.deterministic=true"]
TWO_STAGE = [*BASE, "freeze=two_stage", "freeze.head_epochs=2", "freeze.finetune_epochs=2",
             "freeze.fine_tune_at=-2"]
GRADUAL = [*BASE, "freeze=gradual", "freeze.gradual.every=1", "freeze.gradual.blocks=2",
           "freeze.gradual.head_epochs=1"]
AUTOENCODER = ["experiment=ae_pretrain", "trainer.epochs=3", "trainer.num_workers=0",
               "trainer.progress=false", "trainer.deterministic=true"]
CONFIGS = {"two_stage": TWO_STAGE, "gradual": GRADUAL, "autoencoder": AUTOENCODER}

pytestmark = pytest.mark.slow  # whole runs in processes of their own


def launch(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_SWE")}
    env.update(HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "transferlab.train", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = launch(args, cwd)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def checkpoint_epoch(run_dir: Path) -> tuple[int, bool] | None:
    """(epoch, mid-epoch?) of ``last.pt`` now, or None."""
    try:
        ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    except Exception:  # not there yet, or being replaced
        return None
    return ckpt["epoch"], bool(ckpt["loop"].get("partial"))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def state_and_record(run_dir: Path):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["history"]]
    return ckpt["model"], history, metrics["best"], metrics


def assert_same_run(reference: Path, resumed: Path) -> None:
    model_a, history_a, best_a, _ = state_and_record(reference)
    model_b, history_b, best_b, metrics = state_and_record(resumed)
    assert model_a.keys() == model_b.keys()
    diff = max((model_a[k].double() - model_b[k].double()).abs().max().item() for k in model_a)
    assert diff == 0.0, f"max |dW| = {diff}"
    assert history_a == history_b  # losses, accuracies, LRs per group, stages
    assert best_a == best_b
    assert metrics["status"] == "completed" and metrics["resumes"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs of each config (computed once)."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, args in CONFIGS.items():
        proc = run_cli([*args, f"hydra.run.dir={root / name}"], root)
        assert proc.returncode == 0, proc.stderr
        out[name] = root / name
    return out


@pytest.mark.parametrize(("config", "k", "where"), [
    ("two_stage", 1, "inside stage 1"),
    ("two_stage", 2, "at the stage boundary"),
    ("two_stage", 3, "inside stage 2"),
    ("gradual", 2, "inside the second of three stages"),
    ("autoencoder", 1, "task=autoencoder"),
])
def test_sigkill_after_epoch_k_then_resume_is_bit_identical(config, k, where, references,
                                                            tmp_path):
    args = CONFIGS[config]
    run_dir = tmp_path / "run"
    proc = launch([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (checkpoint_epoch(run_dir) or (0, False))[0] >= k, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert checkpoint_epoch(run_dir) == (k, False), "killed too late to test this k"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "running"  # what SIGKILL leaves; the checkpoint is whole
    assert read_run(run_dir).status == "dead"  # what transferlab-compare shows

    resumed = run_cli([f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(references[config], run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["resumes"][0]["from_epoch"] == k


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_cleanly_and_resume_exactly(sig, code, references, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch([*TWO_STAGE, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (checkpoint_epoch(run_dir) or (0, False))[0] >= 1, proc)
    time.sleep(0.3)  # part-way through epoch 2
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == (f"interrupted ({signal.Signals(sig).name}): go on with "
                         f"transferlab-train resume=run")  # as typed here (cwd: tmp_path)
    assert "Traceback" not in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert metrics["resume_command"] == f"transferlab-train resume={run_dir}"

    resumed = run_cli([f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(references["two_stage"], run_dir)


def test_resume_auto_runs_only_the_killed_job_again(tmp_path):
    sweep = ["-m", *BASE, "trainer.epochs=2", "dataset.samples_per_class=30",
             "trainer.keep_checkpoints=all", "seed=0,1"]
    first = run_cli(sweep, tmp_path)
    assert first.returncode == 0, first.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").glob("*/*")
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    # job 1 died after its first epoch: as SIGKILL leaves it
    killed = jobs[1]
    done = {p: (p / "metrics.json").stat().st_mtime_ns for p in jobs}
    ckpt = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    reference = ckpt["model"]
    _rewind_to_epoch_1(killed)

    again = run_cli([*sweep, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resume=auto: going on with {sweep_dir.relative_to(tmp_path)}" in again.stdout
    assert (jobs[0] / "metrics.json").stat().st_mtime_ns == done[jobs[0]]  # not run again
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["resumes"][0]["from_epoch"] == 1
    now = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(now[k], reference[k]) for k in reference)


def _rewind_to_epoch_1(job: Path) -> None:
    """Make a finished job look as if SIGKILL hit it during epoch 2: its checkpoint of epoch
    1 (kept with keep_checkpoints=all) as last.pt, and a running record."""
    ckpts = job / "checkpoints"
    (ckpts / "last.pt").write_bytes((ckpts / "epoch_1.pt").read_bytes())
    metrics = json.loads((job / "metrics.json").read_text())
    metrics.update(status="running", history=metrics["history"][:1], pid=999999999)
    (job / "metrics.json").write_text(json.dumps(metrics))


# --- refusals (one line each, in process: fast) ---------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    train(compose_train([*BASE, "trainer.epochs=1", "dataset.samples_per_class=10"]), run_dir)
    return run_dir


def test_resume_refuses_a_completed_run_but_extends_it(finished, tmp_path):
    with pytest.raises(UserError, match="the run is completed .1 epochs.: nothing to resume"):
        resume_run(finished)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished), str(copy)], check=True)
    result = resume_run(copy, ["trainer.epochs=2"])
    assert [h["epoch"] for h in result.metrics["history"]] == [1, 2]


@pytest.mark.parametrize(("override", "says"), [
    ("optimizer.lr=0.5", "would change it"),
    ("seed=3", "would change it"),
    ("trainer.epochs=0", "at least"),
])
def test_resume_refuses_overrides_that_change_the_run(finished, override, says):
    with pytest.raises(UserError, match=says):
        resume_run(finished, [override])


def test_resume_refuses_what_is_not_a_resumable_run(finished, tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resume_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a transferlab run directory"):
        resume_run(tmp_path / "empty")
    old = tmp_path / "old"
    subprocess.run(["cp", "-r", str(finished), str(old)], check=True)
    ckpt = torch.load(old / "checkpoints" / "last.pt", weights_only=True)
    ckpt["format"] = "transferlab-checkpoint/1"
    torch.save(ckpt, old / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match=f"another transferlab version.*{FORMAT}"):
        resume_run(old, ["trainer.epochs=2"])


def test_resume_refuses_changed_data(finished, tmp_path):
    changed = tmp_path / "changed"
    subprocess.run(["cp", "-r", str(finished), str(changed)], check=True)
    ckpt = torch.load(changed / "checkpoints" / "last.pt", weights_only=True)
    ckpt["loop"]["data"]["train"] += 5
    torch.save(ckpt, changed / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match=r"data set changed.*train \d+ -> \d+ images"):
        resume_run(changed, ["trainer.epochs=2"])


def test_same_config_names_the_differing_keys():
    assert same_config({"a": {"b": 1}, "resume": None}, {"a": {"b": 2}, "resume": "auto"}) \
        == ["a.b"]


# --- run directories ------------------------------------------------------------------------


def test_a_run_directory_is_claimed_once_and_never_shared(tmp_path):
    from transferlab.infra import run_dirs

    target = str(tmp_path / "runs" / "10-00-00_digits")
    first = run_dirs.claim(target)
    assert first == target and Path(first).is_dir()
    assert run_dirs.claim(target) == first  # the same process asks again: the same directory
    run_dirs._claimed.clear()  # as another process would
    assert run_dirs.claim(target) == target + "-2"
    run_dirs._claimed.clear()
    assert run_dirs.claim(target) == target + "-3"


def test_a_finished_run_is_not_written_into(finished, tmp_path):
    before = (finished / "metrics.json").read_text()
    proc = run_cli([*BASE, f"hydra.run.dir={finished}"], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: hydra.run.dir={finished} holds a run (completed): choose another "
                     f"directory, or go on with that run with resume={finished}"]
    assert (finished / "metrics.json").read_text() == before
