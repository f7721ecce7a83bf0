"""What a resume refuses, in one line, instead of going on wrongly: a damaged checkpoint (its
SHA-256 seal), one with missing keys, a data set that changed on disk, a run another process
is writing (its lock); and the commands that say how to go on."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from transferlab.errors import UserError
from transferlab.infra.checkpoint import (
    SEAL,
    CorruptCheckpoint,
    check_seal,
    read_file,
    save_checkpoint,
)
from transferlab.infra.processes import resume_command
from transferlab.infra.run_dirs import LOCK_FILE, lock_run
from transferlab.run.jobs import _how_to_go_on
from transferlab.run.resume import check_data, resume_checkpoint

from .test_resume import BASE, checkpoint_epoch, launch, run_cli, wait_for

HOST = socket.gethostname()


def flip_middle(path: Path, count: int = 2000) -> None:
    """Invert ``count`` bytes in the middle of ``path`` (a damaged disk block)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def small_checkpoint(path: Path) -> None:
    model = nn.Linear(4, 3)
    save_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    epoch=1, stage_index=0, stage_name="head", config={}, history=[],
                    best=None, classes=["a", "b", "c"],
                    loop={"step": 3, "schedule_step": 3, "data": {}})


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# --- the seal: fast mechanics ---------------------------------------------------------------


def test_a_checkpoint_is_sealed_and_still_a_torch_file(tmp_path):
    path = tmp_path / "last.pt"
    small_checkpoint(path)
    assert check_seal(path) is True
    assert path.read_bytes()[-len(SEAL) - 64:].startswith(SEAL)
    assert zipfile.ZipFile(path).testzip() is None  # a valid zip archive, its comment the seal
    assert torch.load(path, weights_only=True)["epoch"] == 1  # what other tools read
    assert read_file(path)["classes"] == ["a", "b", "c"]
    assert not path.with_suffix(".tmp").exists()  # written to a temporary file, renamed


@pytest.mark.parametrize("where", ["middle", "digest"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_others(tmp_path, where):
    path = tmp_path / "last.pt"
    small_checkpoint(path)
    shutil.copyfile(path, tmp_path / "epoch_1.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if where == "middle" else -1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint) as info:
        read_file(path)
    message = str(info.value)
    assert message == (f"checkpoint: {path} is corrupt: its bytes do not match the SHA-256 "
                       "written with it (a damaged disk or an interrupted copy); use another "
                       "of its checkpoints (epoch_1.pt) or train again")
    assert isinstance(info.value, UserError)


def test_a_checkpoint_without_a_seal_loads_unchecked(tmp_path):
    path = tmp_path / "old.pt"  # as earlier versions (and torch.save anywhere) wrote it
    torch.save({"format": "transferlab-checkpoint/2", "model": {"w": torch.ones(2)}}, path)
    assert check_seal(path) is False
    assert torch.equal(read_file(path)["model"]["w"], torch.ones(2))


# --- the checkpoint's keys, the data's identity, the lock: fast mechanics ----------------------


def test_a_checkpoint_with_missing_keys_names_them(tmp_path):
    run_dir = tmp_path / "run"
    path = run_dir / "checkpoints" / "last.pt"
    small_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["epoch"], ckpt["loop"]["schedule_step"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"lacks epoch, loop.schedule_step \(a damaged or edited "
                                        r"checkpoint\): it kept no other checkpoint; start"):
        resume_checkpoint(run_dir)


def test_changed_images_of_the_same_count_are_refused_naming_the_split(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- dataset=image_folder\n"
                                                        "- dataset.root=/data/x y\n")
    saved = {"train": 4, "val": 2, "test": 0, "classes": ["a", "b"],
             "identity": {"train": "1", "val": "2"}}
    check_data(saved, json.loads(json.dumps(saved)), tmp_path)  # the same: goes on
    check_data({k: v for k, v in saved.items() if k != "identity"}, saved, tmp_path)  # older
    now = {**saved, "identity": {"train": "1", "val": "3"}}
    with pytest.raises(UserError) as info:
        check_data(saved, now, tmp_path)
    assert str(info.value) == (
        "the data set changed since the run started (val: the same 2 images by count, but "
        "their files or labels changed): a resume would not give the run's result; start a "
        "new run: transferlab-train dataset=image_folder 'dataset.root=/data/x y'")


def _live_on(started) -> None:
    import time

    started.set()

    time.sleep(60)


def test_a_locked_run_refuses_a_second_writer_naming_the_pid(tmp_path):
    with lock_run(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()} {HOST}\n"
        with pytest.raises(UserError, match=rf"^{tmp_path} is in use by another process \(pid "
                                            rf"{os.getpid()} on {HOST}\) that trains or "
                                            "resumes it: wait for it to end, or stop it"):
            with lock_run(tmp_path):
                pass
        # a forked child (a DataLoader worker) does not keep the lock after its parent
        fork = multiprocessing.get_context("fork")
        started = fork.Event()
        child = fork.Process(target=_live_on, args=(started,))
        child.start()
        assert started.wait(60)  # the child runs (its copy of the lock's descriptor closed)
    try:
        with lock_run(tmp_path):  # the parent let it go: free, though the child lives on
            assert child.is_alive()
    finally:
        child.kill()
        child.join()


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with lock_run(tmp_path):
        pass
    assert "no lock taken (No locks available)" in caplog.text


def test_resume_commands_name_torchrun_and_resume_auto(monkeypatch):
    assert resume_command("r") == "transferlab-train resume=r"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command("r") == "torchrun --nproc_per_node=4 -m transferlab.train resume=r"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resume_command("r") == ("torchrun --nnodes=2 --nproc_per_node=4 -m "
                                   "transferlab.train resume=r")
    assert _how_to_go_on(["-m", "seed=0,1", "resume=auto", "a b=1"], True, Path("r/0")) == \
        ": go on with transferlab-train -m seed=0,1 'a b=1' resume=auto"


# --- real processes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_corrupt_last_pt_is_refused_by_resume_and_eval(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    flip_middle(last)
    before = (run_dir / "metrics.json").read_text()
    proc = run_cli([f"resume={run_dir}", "trainer.epochs=3"], tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"error: resume={run_dir}: {last} is corrupt (its bytes do not match the SHA-256 "
        f"written with it): go back to an earlier checkpoint of the run (best.pt): cp "
        f"{run_dir / 'checkpoints' / 'best.pt'} {last}, then resume again; or start the run "
        "again"]
    assert (run_dir / "metrics.json").read_text() == before  # the record is left as it was
    evaluated = subprocess.run([sys.executable, "-m", "transferlab.cli.evaluate",
                                f"run={run_dir}", "checkpoint=last"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 2
    assert error_lines(evaluated) == [f"error: checkpoint: {last} is corrupt: its bytes do not "
                                      "match the SHA-256 written with it (a damaged disk or an "
                                      "interrupted copy); use another of its checkpoints "
                                      "(best.pt) or train again"]


@pytest.mark.slow
def test_a_checkpoint_missing_keys_is_one_line_not_a_traceback(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["epoch"]
    torch.save(ckpt, last)
    proc = run_cli([f"resume={run_dir}", "trainer.epochs=3"], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert error_lines(proc) == [
        f"error: resume={run_dir}: {last} has the format tag 'transferlab-checkpoint/2' but "
        f"lacks epoch (a damaged or edited checkpoint): go back to an earlier checkpoint of the "
        f"run (best.pt): cp {run_dir / 'checkpoints' / 'best.pt'} {last}, then resume again; "
        "or start the run again"]


def _image_folder(root: Path) -> None:
    """root/{train,val}/{ants,bees}/*.png: tiny images, the classes told apart by colour."""
    for split, count in (("train", 6), ("val", 3)):
        for label, name in enumerate(("ants", "bees")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 12), (40 + 150 * label, 20 * i, 90)).save(
                    folder / f"{i}.png")


@pytest.mark.slow
def test_a_resume_refuses_images_swapped_between_classes(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    run_dir = tmp_path / "run"
    args = [*BASE, "dataset=image_folder", f"dataset.root={root}", "trainer.epochs=1"]
    first = run_cli([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr
    same = tmp_path / "same"
    shutil.copytree(run_dir, same)
    unchanged = run_cli([f"resume={same}", "trainer.epochs=2"], tmp_path)  # the same images
    assert unchanged.returncode == 0, unchanged.stderr
    ants, bees = root / "train" / "ants" / "0.png", root / "train" / "bees" / "0.png"
    ants.rename(tmp_path / "swap.png")
    bees.rename(ants)
    (tmp_path / "swap.png").rename(bees)
    before = (run_dir / "metrics.json").read_text()
    proc = run_cli([f"resume={run_dir}", "trainer.epochs=2"], tmp_path)
    assert proc.returncode == 2
    fresh = " ".join(args)
    assert error_lines(proc) == [
        "error: the data set changed since the run started (train: the same 12 images by "
        "count, but their files or labels changed): a resume would not give the run's result; "
        f"start a new run: transferlab-train {fresh}"]
    assert (run_dir / "metrics.json").read_text() == before


@pytest.mark.slow
def test_a_second_resume_of_a_run_is_refused_while_the_first_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli([*BASE, "trainer.epochs=1", "dataset.samples_per_class=20",
                     f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr
    going = launch([f"resume={run_dir}", "trainer.epochs=500"], tmp_path)
    try:
        wait_for(lambda: (run_dir / LOCK_FILE).read_text() == f"{going.pid} {HOST}\n", going)
        second = run_cli([f"resume={run_dir}", "trainer.epochs=500"], tmp_path)
        assert second.returncode == 2
        assert error_lines(second) == [
            f"error: {run_dir} is in use by another process (pid {going.pid} on {HOST}) that "
            f"trains or resumes it: wait for it to end, or stop it (kill -INT {going.pid}), "
            "then resume again"]
        wait_for(lambda: (checkpoint_epoch(run_dir) or (0, False))[0] >= 2, going)
    finally:
        going.send_signal(signal.SIGINT)
        _, err = going.communicate(timeout=120)
    assert going.returncode == 130, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["resumes"]) == 1  # the second wrote nothing into the run
    epochs = [h["epoch"] for h in metrics["history"]]
    assert epochs == list(range(1, len(epochs) + 1))


@pytest.mark.slow
def test_resuming_a_logreg_run_or_a_run_whose_checkpoint_went_says_why(tiny_run, tmp_path):
    run_dir = tmp_path / "logreg"
    fitted = run_cli([*BASE, "task=logreg", "dataset.samples_per_class=10",
                      f"hydra.run.dir={run_dir}"], tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    proc = run_cli([f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"error: resume={run_dir}: a task=logreg run fits its logistic regression in one pass "
        "(logreg.pkl), with no epochs to go on with or checkpoint to go on from: to fit it "
        "again, start a new run"]
    gone = tmp_path / "gone"
    shutil.copytree(tiny_run, gone)
    (gone / "checkpoints" / "last.pt").unlink()
    proc = run_cli([f"resume={gone}", "trainer.epochs=3"], tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"error: resume={gone}: checkpoints/last.pt is missing, though metrics.json records 2 "
        f"finished epoch(s): it was deleted or moved; put it back, or go back to an earlier "
        f"checkpoint of the run (best.pt): cp {gone / 'checkpoints' / 'best.pt'} "
        f"{gone / 'checkpoints' / 'last.pt'}, then resume again; or start the run again"]


@pytest.mark.slow
def test_an_interrupted_sweep_says_resume_auto_and_that_goes_on(tmp_path):
    sweep = ["-m", *BASE, "trainer.epochs=2", "dataset.samples_per_class=20", "seed=0,1"]
    proc = launch(sweep, tmp_path)
    job0 = tmp_path / "outputs" / "sweeps"
    wait_for(lambda: any(checkpoint_epoch(j) for j in job0.glob("*/*/*")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == ("interrupted (SIGINT): go on with transferlab-train -m "
                         f"{' '.join(sweep[1:])} resume=auto")
    again = run_cli([*sweep, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr
    (sweep_dir,) = job0.glob("*/*")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()]
    assert len(jobs) == 2
    assert all(json.loads((j / "metrics.json").read_text())["status"] == "completed"
               for j in jobs)


@pytest.mark.slow
def test_an_interrupted_ddp_run_names_torchrun_with_its_processes(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "transferlab.train", *BASE,
                             "trainer.epochs=200", "dataset.samples_per_class=20",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (checkpoint_epoch(run_dir) or (0, False))[0] >= 1, proc)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends; torchrun passes it on
    _, err = proc.communicate(timeout=180)
    command = "torchrun --nproc_per_node=2 -m transferlab.train resume={}"
    said = command.format("run")  # relative to the working directory (tmp_path), as typed
    assert f"\ninterrupted (SIGTERM): go on with {said}\n" in f"\n{err}", err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["resume_command"] == \
        command.format(run_dir)
