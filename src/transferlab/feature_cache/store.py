"""The content-addressed disk store of cached features.

An entry is a folder ``<root>/<key>/`` holding ``features.npy`` (memory-mappable),
``labels.npy`` and ``meta.json`` (what the key was made of, the shape, the dtype). It is
written under a temporary name and renamed into place when complete, so an entry either is
whole or does not exist: a killed extraction leaves only a ``.tmp-*`` folder, which no reader
trusts and the next writer removes. Processes that want the same entry take an exclusive lock
(``<key>.lock``, released by the kernel if the holder dies): the first extracts, the others
wait and then read its entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.errors import UserError
from transferlab.infra.runtime import cache_root

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the rename still keeps entries whole
    fcntl = None

log = logging.getLogger("transferlab")

FORMAT = "transferlab-features/1"


def default_dir() -> Path:
    """``$TRANSFERLAB_CACHE_DIR/features``, else ``$XDG_CACHE_HOME/transferlab/features``
    (``~/.cache/transferlab/features``)."""
    return cache_root() / "features"


@dataclass
class Entry:
    features: np.ndarray  # (N, ...) memory-mapped, copy-on-write
    labels: np.ndarray  # (N,) int64
    meta: dict
    path: Path

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes)


class DiskStore:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def check_writable(self) -> str | None:
        """None when entries can be written here, else why not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"cannot write in {self.root} ({exc.strerror or exc})"
        return None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def get(self, key: str) -> Entry | None:
        """The complete entry ``key``, memory-mapped, or None (absent or unreadable)."""
        folder = self.root / key
        try:
            meta = json.loads((folder / "meta.json").read_text())
            features = np.load(folder / "features.npy", mmap_mode="c")
            labels = np.load(folder / "labels.npy")
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT or list(features.shape) != meta.get("shape") \
                or str(features.dtype) != meta.get("dtype") or len(labels) != len(features):
            log.warning("feature cache entry %s does not match its meta.json: ignored", folder)
            return None
        return Entry(features, labels, meta, folder)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the entry's lock: one process extracts it, the others wait for it."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.root / f"{key}.lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("feature cache: another process is extracting entry %s; waiting for it",
                         key[:12])
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def put(self, key: str, shape: tuple[int, ...], dtype: str, meta: dict,
            fill: Callable[[np.ndarray, np.ndarray], None]) -> Entry:
        """Write entry ``key``: ``fill(features, labels)`` writes into memory-mapped arrays of
        ``shape`` in a temporary folder, which is renamed into place once complete."""
        self._remove_stale()
        tmp = self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{key}"
        tmp.mkdir(parents=True)
        try:
            features = np.lib.format.open_memmap(tmp / "features.npy", mode="w+",
                                                 dtype=np.dtype(dtype), shape=shape)
            labels = np.zeros(shape[0], dtype=np.int64)
            fill(features, labels)
            features.flush()
            del features
            np.save(tmp / "labels.npy", labels)
            meta = {**meta, "format": FORMAT, "shape": list(shape), "dtype": dtype,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            for name in ("features.npy", "labels.npy", "meta.json"):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # written meanwhile by a process that did not lock (no fcntl)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = self.get(key)
        if entry is None:
            raise UserError(f"the feature cache entry {self.root / key} cannot be read back: "
                            "delete it, or set trainer.feature_cache.mode=off")
        return entry

    def _remove_stale(self) -> None:
        """Temporary folders of extractions whose process is gone (killed, crashed)."""
        for tmp in self.root.glob(".tmp-*"):
            pid = tmp.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
