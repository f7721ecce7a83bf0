"""The feature cache when its files, its disk or another process misbehave, through the real
console scripts: a poisoned, shifted or truncated entry, an image replaced in place, a full
disk, a stopped lock holder, an unopenable lock, file names that are not UTF-8."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.errors import UserError
from transferlab.tools.features import save_npz

from .conftest import TINY, cli

# digits, 2 epochs at lr 0.03: the clean cache gives a val acc well above chance
RUN = [*TINY, "trainer.epochs=2", "optimizer.lr=0.03"]


def _train(tmp_path: Path, name: str, store: Path, *extra: str):
    proc = cli([*RUN, f"trainer.feature_cache.dir={store}", f"hydra.run.dir={tmp_path / name}",
                *extra], tmp_path)
    metrics_file = tmp_path / name / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    return proc, metrics


def _entries(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.suffix != ".lock")


def _entry_of(store: Path, rows: int) -> Path:
    """The store's entry of ``rows`` samples (digits: train 1437, val 360)."""
    (entry,) = [e for e in _entries(store)
                if json.loads((e / "meta.json").read_text())["shape"][0] == rows]
    return entry


def _warnings(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if "[WARNING]" in line]


# -- 1. poisoned, shifted, truncated entries --------------------------------------------------

@pytest.mark.slow
def test_a_poisoned_entry_is_replaced_and_the_run_trains_on_clean_features(tmp_path):
    store = tmp_path / "store"
    proc, clean = _train(tmp_path, "clean", store)
    assert proc.returncode == 0, proc.stderr
    assert clean["feature_cache"]["head"]["splits"] == {"train": "extracted", "val": "extracted"}
    acc = clean["final"]["val_acc"]
    assert acc > 0.5

    # train: other features, same size and header; val: its labels shifted by one, and the
    # checksum in meta.json rewritten as someone without this user's key can
    train = np.load(_entry_of(store, 1437) / "features.npy", mmap_mode="r+")
    train[:] = np.random.default_rng(0).standard_normal(train.shape).astype(train.dtype)
    train.flush()
    del train
    val = _entry_of(store, 360)
    np.save(val / "labels.npy", np.roll(np.load(val / "labels.npy"), 1))
    meta = json.loads((val / "meta.json").read_text())
    meta["checksums"]["labels"] = "0" * 64
    (val / "meta.json").write_text(json.dumps(meta))

    proc, healed = _train(tmp_path, "poisoned", store)
    assert proc.returncode == 0, proc.stderr
    warnings = _warnings(proc)
    assert len(warnings) == 2, proc.stdout
    assert "features.npy differs from its checksum" in warnings[0]
    assert "labels" in warnings[1] and all("extracting it again" in w for w in warnings)
    assert healed["feature_cache"]["head"]["splits"] == {"train": "extracted", "val": "extracted"}
    assert healed["status"] == "completed" and healed["final"]["val_acc"] == acc

    # truncated: replaced, then read by the next run
    features = _entry_of(store, 1437) / "features.npy"
    features.write_bytes(features.read_bytes()[:-100])
    proc, again = _train(tmp_path, "truncated", store)
    assert proc.returncode == 0, proc.stderr
    assert "unreadable" in _warnings(proc)[0]
    assert again["feature_cache"]["head"]["splits"] == {"train": "extracted", "val": "disk"}
    proc, warm = _train(tmp_path, "warm", store)
    assert proc.returncode == 0 and _warnings(proc) == []
    assert warm["feature_cache"]["head"]["splits"] == {"train": "disk", "val": "disk"}
    assert again["final"]["val_acc"] == warm["final"]["val_acc"] == acc
    assert len(_entries(store)) == 2 and not list(store.glob(".bad-*"))


# -- 2. an image replaced in place ------------------------------------------------------------

def _folder(root: Path, odd_name: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.bmp")
    if odd_name:
        pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.fsdecode(os.fsencode(root / "train" / "a") + b"/\xff.bmp"))
    return root


@pytest.mark.slow
def test_an_image_replaced_with_its_size_and_time_kept_is_extracted_again(tmp_path):
    root = _folder(tmp_path / "images")
    store, data = tmp_path / "store", ["dataset=image_folder", f"dataset.root={root}"]
    proc, first = _train(tmp_path, "first", store, *data)
    assert proc.returncode == 0, proc.stderr
    image = root / "train" / "b" / "2.bmp"
    stat = image.stat()
    pixels = np.random.default_rng(9).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)  # another image, the same size (BMP)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size

    proc, second = _train(tmp_path, "second", store, *data)
    assert proc.returncode == 0, proc.stderr
    assert second["feature_cache"]["head"]["splits"] == {"train": "extracted", "val": "disk"}
    # identity=stat: path, size and time only; it cannot see the change (documented)
    proc, blind = _train(tmp_path, "stat", store, *data, "trainer.feature_cache.identity=stat")
    assert proc.returncode == 0, proc.stderr
    assert blind["feature_cache"]["head"]["splits"] == {"train": "extracted",
                                                        "val": "extracted"}  # another key
    proc, _ = _train(tmp_path, "stat2", store, *data, "trainer.feature_cache.identity=stat")
    assert "train 8 hit (disk), val 8 hit (disk)" in proc.stdout

    proc = cli([*RUN, f"hydra.run.dir={tmp_path / 'off'}", "trainer.feature_cache.mode=off",
                "trainer.feature_cache.identity=stat"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.feature_cache.mode=off caches no features and does not use "
        "trainer.feature_cache.identity: remove 'trainer.feature_cache.identity=stat'"]


# -- 7. file names that are not UTF-8 ---------------------------------------------------------

@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_trains_and_predicts(tmp_path):
    root = _folder(tmp_path / "images", odd_name=True)
    proc, metrics = _train(tmp_path, "run", tmp_path / "store", "dataset=image_folder",
                           f"dataset.root={root}")
    assert proc.returncode == 0, proc.stderr
    assert metrics["feature_cache"]["head"]["splits"]["train"] == "extracted"
    assert "train 9 extracted" in proc.stdout
    out = tmp_path / "predictions.csv"
    proc = subprocess.run([sys.executable, "-m", "transferlab.cli.predict",
                           f"run={tmp_path / 'run'}", f"output={out}", str(root / "train" / "a")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = out.read_bytes().splitlines()[1:]
    assert len(rows) == 5
    odd = [r for r in rows if b"\xff.bmp" in r]
    assert len(odd) == 1 and Path(os.fsdecode(odd[0].split(b",")[0])).is_file()


# -- full disks: a small tmpfs ----------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (mounting needs root, or a user namespace allowing it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` to the last byte, then give back ``leave`` bytes."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError:
                    break
        os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)


_HOLD = textwrap.dedent("""
    import sys, time
    from transferlab.feature_cache.store import DiskStore
    with DiskStore(sys.argv[1]).lock(sys.argv[2]):
        print("locked", flush=True)
        time.sleep(600)
""")


def _hold(store: Path, key: str) -> subprocess.Popen:
    """A process that takes ``key``'s lock in ``store`` and holds it (for 600 s)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(store), key],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _keys(tmp_path: Path) -> dict[int, str]:
    """The entry names (train: 1437 rows, val: 360) of RUN, learnt from a run."""
    learn = tmp_path / "learn-store"
    proc, _ = _train(tmp_path, "learn", learn)
    assert proc.returncode == 0, proc.stderr
    return {rows: _entry_of(learn, rows).name for rows in (1437, 360)}


@pytest.mark.slow
def test_a_disk_filled_during_extraction_is_one_error_line_and_a_failed_run(tmp_path,
                                                                           small_disk):
    train_key = _keys(tmp_path)[1437]
    store = small_disk / "store"
    holder = _hold(store, train_key)  # the run waits here, after its free-space check
    run = subprocess.Popen(
        [sys.executable, "-m", "transferlab.train", *RUN, f"trainer.feature_cache.dir={store}",
         f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    for line in run.stdout:
        if "waiting for it" in line:
            break
    _fill(small_disk, leave=1 << 16)  # another job took the space meanwhile, but 64 KB
    holder.kill()
    holder.wait()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 2, (out, err)  # once: SIGBUS (-7), nothing on stderr
    assert err.strip().splitlines() == [
        f"error: feature cache: cannot write an entry in {store} (No space left on device): "
        "free space there, set trainer.feature_cache.dir to another folder, or "
        "trainer.feature_cache.mode=memory"]
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left" in metrics["error"]
    assert not list(store.glob(".tmp-*"))  # the partial entry is gone


@pytest.mark.slow
def test_features_export_over_a_full_disk_keeps_the_earlier_file(tmp_path, small_disk):
    out = small_disk / "feats.npz"
    command = [sys.executable, "-m", "transferlab.cli.features", *TINY,
               f"trainer.feature_cache.dir={tmp_path / 'store'}", f"output={out}"]
    first = subprocess.run([*command, "dataset.train_fraction=0.5"], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)  # a smaller file first
    assert first.returncode == 0, first.stderr
    before = dict(np.load(out))
    _fill(small_disk)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: output={out}: cannot write it (No space left on device): free space in its "
        "folder, or choose another output="]
    after = np.load(out)  # once: a truncated file, "File is not a zip file"
    assert sorted(after.files) == sorted(before) and all(
        np.array_equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in small_disk.iterdir()) == ["feats.npz", "filler"]


def test_save_npz_leaves_no_partial_file(tmp_path, monkeypatch):
    from transferlab.data import DataSplits

    out = tmp_path / "f.npz"
    out.write_bytes(b"earlier")

    def full(file, **arrays):
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full)
    splits = DataSplits.__new__(DataSplits)
    splits.classes = ["a"]
    with pytest.raises(UserError, match="No space left on device"):
        save_npz(out, splits, {"train": (np.zeros((1, 2)), np.zeros(1))})
    assert out.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["f.npz"]


# -- 5, 6. a stopped lock holder; a lock file that cannot be opened ---------------------------

@pytest.mark.slow
def test_a_stopped_lock_holder_is_named_after_the_timeout(tmp_path):
    train_key = _keys(tmp_path)[1437]
    store = tmp_path / "store"
    holder = _hold(store, train_key)
    holder.send_signal(signal.SIGSTOP)
    try:
        proc, metrics = _train(tmp_path, "waits", store, "trainer.feature_cache.lock_timeout=3")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: feature cache: {store / train_key}.lock is held by pid "
                           f"{holder.pid} on host {os.uname().nodename} (stopped: kill -CONT "
                           f"{holder.pid}, or end it), which has shown no progress for 3 s")
    assert metrics["status"] == "failed"


@pytest.mark.slow
def test_a_lock_that_cannot_be_opened_falls_back_to_memory_or_fails_in_disk_mode(tmp_path):
    train_key = _keys(tmp_path)[1437]
    store = tmp_path / "store"
    store.mkdir()
    (store / f"{train_key}.lock").mkdir()  # unopenable (root ignores a file's mode bits)
    proc, metrics = _train(tmp_path, "auto", store)
    assert proc.returncode == 0, proc.stderr
    (warning,) = _warnings(proc)
    assert f"cannot open the lock file {store / train_key}.lock" in warning
    assert "kept in memory for this run only" in warning
    assert metrics["feature_cache"]["head"]["splits"] == {"train": "extracted",
                                                          "val": "extracted"}
    written = [e.name for e in _entries(store)]
    assert len(written) == 1 and train_key not in written  # only val's entry was written

    proc, metrics = _train(tmp_path, "disk", store, "trainer.feature_cache.mode=disk")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: trainer.feature_cache.mode=disk: cannot open the lock file "
                           f"{store / train_key}.lock (Is a directory): make it a file you can "
                           "write (or delete it)")
    assert metrics["status"] == "failed"
