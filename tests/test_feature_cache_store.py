"""The disk store's mechanics, without a model: keyed checksums, a bad entry replaced, space
reserved before mapping, the lock's holder, progress and timeout, file identities."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from transferlab.errors import UserError
from transferlab.feature_cache.identity import dataset_identity, dataset_labels, file_identity
from transferlab.feature_cache.store import FORMAT, DiskStore, LockUnavailable, signing_key

KEY = b"k" * 32
LABELS = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)


def _put(store: DiskStore, key: str = "e", labels: np.ndarray = LABELS):
    def fill(features, into_labels):
        features[:] = np.arange(features.size, dtype=np.float32).reshape(features.shape)
        into_labels[:] = labels

    return store.put(key, (len(labels), 4), "float16", {"key": {"x": 1}}, fill)


def test_an_entry_reads_back_checked_and_any_change_is_caught(tmp_path):
    store = DiskStore(tmp_path, key=KEY)
    _put(store)
    entry, bad = store.lookup("e", LABELS)
    assert bad is None and entry.meta["format"] == FORMAT
    np.testing.assert_array_equal(entry.labels, LABELS)
    assert store.lookup("absent") == (None, None)
    assert isinstance(entry.features, np.memmap)  # large next to read_below (0): mapped
    read = store.lookup("e", LABELS, read_below=1 << 30)[0].features  # read, then checked
    assert not isinstance(read, np.memmap) and read.shape == (6, 4)
    # the dataset's labels are not the entry's: bad, whatever the checksums say
    assert store.lookup("e", np.roll(LABELS, 1))[1] == "its labels differ from the dataset's"

    folder = tmp_path / "e"
    features = np.load(folder / "features.npy", mmap_mode="r+")  # same size, same header
    features[2, 1] += 1
    features.flush()
    del features
    assert store.lookup("e", LABELS) == (None, "features.npy differs from its checksum")

    # whoever rewrites meta.json's checksums too lacks the key: still bad
    poisoned = np.load(folder / "features.npy")
    meta = json.loads((folder / "meta.json").read_text())
    meta["checksums"]["features"] = hashlib.sha256(poisoned.tobytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    assert store.lookup("e", LABELS)[1] == "features.npy differs from its checksum"
    # ... and so does an entry signed with another key
    _put(store, "f")
    assert DiskStore(tmp_path, key=b"o" * 32).lookup("f", LABELS)[1] == (
        "features.npy differs from its checksum")


def test_shifted_labels_and_truncated_features_are_bad(tmp_path):
    store = DiskStore(tmp_path, key=KEY)
    _put(store)
    np.save(tmp_path / "e" / "labels.npy", np.roll(LABELS, 1))
    assert store.lookup("e")[1] == "labels.npy differs from its checksum"
    _put(store, "g")
    path = tmp_path / "g" / "features.npy"
    path.write_bytes(path.read_bytes()[:-8])
    entry, bad = store.lookup("g", LABELS)
    assert entry is None and bad.startswith("unreadable")


def test_a_bad_entry_is_replaced_in_place_by_the_next_put(tmp_path):
    store = DiskStore(tmp_path, key=KEY)
    _put(store)
    path = tmp_path / "e" / "features.npy"
    path.write_bytes(path.read_bytes()[:-8])  # truncated: once every later run failed here
    assert store.get("e", LABELS) is None
    entry = _put(store)
    assert store.lookup("e", LABELS)[1] is None and entry.features.shape == (6, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # nothing aside, nothing temporary


def test_a_full_disk_is_an_oserror_before_anything_is_mapped(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    def mapped(*args):
        raise AssertionError("fill ran on a disk without the space")

    monkeypatch.setattr(os, "posix_fallocate", full)
    store = DiskStore(tmp_path, key=KEY)
    with pytest.raises(OSError) as caught:
        store.put("e", (6, 4), "float16", {}, mapped)
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_space_is_reserved_by_writing_where_fallocate_is_not_supported(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    rows = 50_000
    store = DiskStore(tmp_path, key=KEY)
    entry = store.put("e", (rows, 16), "float32", {}, lambda f, y: f.fill(1.5))
    st = os.stat(entry.path / "features.npy")
    assert st.st_blocks * 512 >= rows * 16 * 4  # allocated, not a sparse file
    assert (entry.features == 1.5).all()  # the header kept, the data written after


def test_the_signing_key_is_made_once_private_and_checked(tmp_path):
    path = tmp_path / "cfg" / "feature-cache.key"
    key = signing_key(path)
    assert len(key) == 32 and signing_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(UserError, match="must be yours and private .*chmod 600"):
        signing_key(path)


# -- the lock -----------------------------------------------------------------------------------

@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_the_lock_names_its_holder_and_times_out_when_it_shows_no_progress(tmp_path):
    holder, waiter = DiskStore(tmp_path, key=KEY), DiskStore(tmp_path, 1.0, key=KEY)
    with holder.lock("e"):
        text = (tmp_path / "e.lock").read_text()
        assert text == f"{os.getpid()} {socket.gethostname()}\n"
        started = time.monotonic()
        with pytest.raises(UserError) as caught, waiter.lock("e"):
            pass
    assert 1.0 <= time.monotonic() - started < 5
    message = str(caught.value)
    assert f"held by pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "no progress for 1 s" in message and "lock_timeout" in message


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_a_holder_that_shows_progress_is_waited_for_past_the_timeout(tmp_path):
    holder, waiter = DiskStore(tmp_path, key=KEY), DiskStore(tmp_path, 1.5, key=KEY)
    taken = threading.Event()

    def work():
        with holder.lock("e") as held:
            taken.set()
            for _ in range(30):  # 3 s of work, a beat every 0.1 s (a touch every 0.5 s)
                time.sleep(0.1)
                held.beat()

    thread = threading.Thread(target=work)
    thread.start()
    taken.wait(10)
    started = time.monotonic()
    with waiter.lock("e"):
        waited = time.monotonic() - started
    thread.join()
    assert waited > 2.0  # past lock_timeout=1.5: the holder was alive


def test_a_lock_file_that_cannot_be_opened_is_lock_unavailable(tmp_path):
    (tmp_path / "e.lock").mkdir()  # not a file (as a file of another user would be, unwritable)
    store = DiskStore(tmp_path, key=KEY)
    with pytest.raises(LockUnavailable, match="cannot open the lock file .*e.lock"), \
            store.lock("e"):
        pass


def test_a_file_system_without_locks_is_lock_unavailable(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockUnavailable, match="cannot lock the lock file .*No locks available"), \
            DiskStore(tmp_path, key=KEY).lock("e"):
        pass


# -- identities -------------------------------------------------------------------------------

def test_file_identity_by_content_or_stat_and_any_file_name(tmp_path):
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"\xff.png")))
    odd.write_bytes(b"abcd")
    stat = odd.stat()
    by_content, by_stat = file_identity(odd), file_identity(odd, content=False)
    assert by_content.startswith(os.fsencode(os.path.abspath(odd)))
    odd.write_bytes(b"abce")  # the same size, its modification time put back
    os.utime(odd, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_identity(odd, content=False) == by_stat  # stat: blind to it
    assert file_identity(odd) != by_content


def test_dataset_identity_and_labels_of_a_folder_with_a_non_utf8_name(tmp_path):
    from transferlab.data.image_folder import ImageFileDataset

    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"\xff.png")))
    odd.write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"y")
    data = ImageFileDataset([(odd, 1), (tmp_path / "a.png", 0)])
    assert dataset_identity(data) != dataset_identity(data, content=False)
    assert dataset_identity(data) is not None
    np.testing.assert_array_equal(dataset_labels(data), [1, 0])
    assert dataset_labels(object()) is None and dataset_identity(object()) is None


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "says"), [
    (["trainer.feature_cache.identity=bytes"],
     "trainer.feature_cache.identity must be one of content, stat"),
    (["trainer.feature_cache.lock_timeout=0"], "trainer.feature_cache.lock_timeout must be > 0"),
    (["trainer.feature_cache.mode=off", "trainer.feature_cache.identity=stat"],
     "trainer.feature_cache.mode=off caches no features and does not use "
     "trainer.feature_cache.identity"),
    (["trainer.feature_cache.mode=memory", "trainer.feature_cache.lock_timeout=5"],
     "trainer.feature_cache.mode=memory takes no lock and does not use "
     "trainer.feature_cache.lock_timeout"),
])
def test_cache_settings_are_checked_at_composition(overrides, says):
    from transferlab.config import compose_config, load_config

    with pytest.raises(UserError) as exc:
        load_config(compose_config(overrides), overrides)
    assert says in str(exc.value), str(exc.value)


def test_the_defaults_are_content_identity_and_a_five_minute_lock_timeout():
    from transferlab.config import compose_config, load_config

    cache = load_config(compose_config([]), []).trainer.feature_cache
    assert cache.identity == "content" and cache.lock_timeout == 300.0
    overrides = ["trainer.feature_cache.identity=stat", "trainer.feature_cache.lock_timeout=60"]
    cache = load_config(compose_config(overrides), overrides).trainer.feature_cache
    assert cache.identity == "stat" and cache.lock_timeout == 60.0


# -- FeatureCache: which errors of an extraction become the disk's one line ---------------------

def _cache_and_data(tmp_path, fail_with: int | None = None):
    import torch

    from transferlab.backbones import build_backbone, probe_features
    from transferlab.config import BackboneConfig, FeatureCacheConfig
    from transferlab.data.digits import TensorImageDataset
    from transferlab.data.transforms import eval_transform
    from transferlab.feature_cache import FeatureCache
    from transferlab.infra.runtime import Precision

    class Broken(TensorImageDataset):
        def __getitem__(self, i):
            if fail_with is not None:
                raise OSError(fail_with, "cannot read image")
            return super().__getitem__(i)

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                             pretrained=False))
    probe_features(backbone, 32)
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    data = Broken(images, [0, 1, 0, 1, 0, 1], eval_transform(backbone.input, 32))
    cpu = torch.device("cpu")
    cache = FeatureCache(FeatureCacheConfig(dir=str(tmp_path / "store")), cpu,
                         Precision(cpu, "off"), False, 4, 0)
    return cache, backbone, data


def test_a_full_disk_is_one_line_and_an_unreadable_image_keeps_its_error(tmp_path, monkeypatch):
    cache, backbone, data = _cache_and_data(tmp_path, fail_with=errno.EIO)
    with pytest.raises(OSError, match="cannot read image"):
        cache.pooled_features(backbone, 32, {"train": data})

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache, backbone, data = _cache_and_data(tmp_path)
    with pytest.raises(UserError, match=r"cannot write an entry in .*store \(No space left on "
                                        r"device\): free space there"):
        cache.pooled_features(backbone, 32, {"train": data})
    assert not list((tmp_path / "store").glob(".tmp-*"))


def test_a_key_that_cannot_be_made_means_memory_with_auto_and_an_error_with_disk(
        tmp_path, monkeypatch, caplog):
    import torch

    from transferlab.config import FeatureCacheConfig
    from transferlab.feature_cache import FeatureCache
    from transferlab.infra.runtime import Precision

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))  # its "transferlab/" cannot be made
    cpu = torch.device("cpu")
    cache = FeatureCache(FeatureCacheConfig(dir=str(tmp_path / "store")), cpu,
                         Precision(cpu, "off"), False, 4, 0)
    assert cache.store is None
    assert "cannot read or make this user's feature cache key" in caplog.text
    with pytest.raises(UserError, match="mode=disk: cannot read or make .*XDG_CONFIG_HOME"):
        FeatureCache(FeatureCacheConfig(dir=str(tmp_path / "store"), mode="disk"), cpu,
                     Precision(cpu, "off"), False, 4, 0)
