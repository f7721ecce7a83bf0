"""The content-addressed disk store of cached features.

An entry is a folder ``<root>/<key>/`` holding ``features.npy`` (memory-mappable),
``labels.npy`` and ``meta.json`` (what the key was made of, the shape, the dtype and a
checksum of each array). It is written under a temporary name and renamed into place when
complete, so an entry either is whole or does not exist: a killed extraction leaves only a
``.tmp-*`` folder, which no reader trusts and the next writer removes. The space of
``features.npy`` is reserved before it is mapped, so a full disk is an ``OSError`` (one line),
never a SIGBUS.

Every read checks the entry: its shape and dtype against ``meta.json``, each array's bytes
against its checksum, its labels against the dataset's. The checksums are keyed with this
user's secret key (:func:`signing_key`, outside the store), so whoever else can write the
store's folder can neither corrupt an entry nor forge one that passes: a bad entry is logged
and extracted again, and the new one replaces it atomically.

Processes that want the same entry take an exclusive lock (``<key>.lock``, released by the
kernel if the holder dies; it holds the holder's pid and host): the first extracts, the
others wait for it while it shows progress (the lock file's modification time), and give up
with a one-line error naming the holder after ``lock_timeout`` seconds without any.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
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

FORMAT = "transferlab-features/2"  # /2: keyed checksums (entries of /1 are never read)
_CHUNK = 1 << 24  # bytes hashed (or zeroed) at a time


def default_dir() -> Path:
    """``$TRANSFERLAB_CACHE_DIR/features``, else ``$XDG_CACHE_HOME/transferlab/features``
    (``~/.cache/transferlab/features``)."""
    return cache_root() / "features"


def key_file() -> Path:
    """``$XDG_CONFIG_HOME/transferlab/feature-cache.key`` (``~/.config/...``): this user's
    secret key for the store's checksums, kept apart from the store (which may be shared)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "transferlab" / "feature-cache.key"


def signing_key(path: Path | None = None) -> bytes:
    """The secret key in ``path`` (:func:`key_file`), made (32 random bytes, mode 0600) the
    first time. A key that others can read or that another user owns is a :class:`UserError`."""
    path = path or key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            os.link(tmp, path)
        tmp.unlink()
    st = path.stat()
    if hasattr(os, "geteuid") and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
        raise UserError(f"the feature cache key {path} must be yours and private (mode "
                        f"{st.st_mode & 0o777:o}): chmod 600 it, or delete it (a new one is made)")
    key = path.read_bytes()
    if len(key) < 16:
        raise UserError(f"the feature cache key {path} is damaged: delete it (a new one is made)")
    return key


def checksum(key: bytes, array: np.ndarray) -> str:
    """HMAC-SHA256 (keyed with ``key``) of the array's dtype, shape and bytes."""
    mac = hmac.new(key, f"{array.dtype.str}{array.shape}".encode(), hashlib.sha256)
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, len(flat), _CHUNK):
        mac.update(flat[start:start + _CHUNK])
    return mac.hexdigest()


@dataclass
class Entry:
    features: np.ndarray  # (N, ...) memory-mapped, copy-on-write
    labels: np.ndarray  # (N,) int64
    meta: dict
    path: Path

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes)


class LockUnavailable(Exception):  # noqa: N818 (a state, as Interrupted)
    """The entry's lock file cannot be opened (not writable by this user, not a file) or
    locked (a file system without locks)."""

    def __init__(self, path: Path, exc: OSError):
        super().__init__(f"cannot {'lock' if exc.errno == errno.ENOLCK else 'open'} the lock "
                         f"file {path} ({exc.strerror or exc})")
        self.path = path


class Held:
    """A lock being held: :meth:`beat` tells the waiting processes that the holder is alive."""

    def __init__(self, fd: int):
        self.fd, self.last = fd, time.monotonic()

    def beat(self) -> None:
        """Touch the lock file (at most twice a second)."""
        now = time.monotonic()
        if now - self.last >= 0.5:
            os.utime(self.fd)
            self.last = now


class DiskStore:
    def __init__(self, root: Path, lock_timeout: float = 300.0, key: bytes | None = None):
        self.root = Path(root).expanduser()
        self.lock_timeout = lock_timeout
        self._key = key

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = signing_key()
        return self._key

    @property
    def signer(self) -> str:
        """A public name of this store's key: entries of different keys have different keys."""
        return hashlib.sha256(b"transferlab signer " + self.key).hexdigest()[:16]

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

    def get(self, key: str, labels: np.ndarray | None = None) -> Entry | None:
        """The complete, checked entry ``key``, memory-mapped, or None (absent or bad)."""
        return self.lookup(key, labels)[0]

    def lookup(self, key: str, labels: np.ndarray | None = None, read_below: int = 0
               ) -> tuple[Entry | None, str | None]:
        """(the entry, None) when ``key`` is whole and passes its checks (its labels equal to
        ``labels`` where given); (None, None) when absent; (None, what is wrong) when bad.
        Features of fewer than ``read_below`` bytes are read into memory before they are
        checked (what is checked is what the caller gets), others stay memory-mapped."""
        folder = self.root / key
        if not folder.exists():
            return None, None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            features = np.load(folder / "features.npy", mmap_mode="c")
            stored = np.load(folder / "labels.npy")
            if features.nbytes < read_below:
                features = np.array(features)  # one read
        except (OSError, ValueError, EOFError) as exc:
            return None, f"unreadable ({exc})"
        return self._checked(meta, features, stored, labels, folder)

    def _checked(self, meta, features, stored, labels, folder: Path):
        if not isinstance(meta, dict) or meta.get("format") != FORMAT \
                or list(features.shape) != meta.get("shape") \
                or str(features.dtype) != meta.get("dtype") or len(stored) != len(features):
            return None, "its arrays do not match its meta.json"
        sums = meta.get("checksums") or {}
        for name, array in (("features", features), ("labels", stored)):
            if not hmac.compare_digest(str(sums.get(name)).encode(),
                                       checksum(self.key, array).encode()):
                return None, f"{name}.npy differs from its checksum"
        if labels is not None and not np.array_equal(stored, labels):
            return None, "its labels differ from the dataset's"
        return Entry(features, stored, meta, folder), None

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[Held | None]:
        """Hold the entry's lock: one process extracts it, the others wait for it. A lock
        file that cannot be opened raises :class:`LockUnavailable`."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield None
            return
        path = self.root / f"{key}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise LockUnavailable(path, exc) from None
        try:
            try:
                self._acquire(fd, path)
            except OSError as exc:  # a file system without locks (ENOLCK)
                raise LockUnavailable(path, exc) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            yield Held(fd)
        finally:
            os.close(fd)  # releases the lock

    def _acquire(self, fd: int, path: Path) -> None:
        """Take the lock; wait while its holder shows progress, for ever; give up after
        ``lock_timeout`` seconds without any (a stopped or hung holder)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        log.info("feature cache: %s is extracting entry %s; waiting for it", _holder(fd),
                 path.stem[:12])
        seen, since = os.fstat(fd).st_mtime_ns, time.monotonic()
        while True:
            time.sleep(0.2)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            mtime = os.fstat(fd).st_mtime_ns
            if mtime != seen:
                seen, since = mtime, time.monotonic()
            elif time.monotonic() - since > self.lock_timeout:
                raise UserError(
                    f"feature cache: {path} is held by {_holder(fd)}, which has shown no "
                    f"progress for {self.lock_timeout:g} s: resume or end that process, or set "
                    "trainer.feature_cache.mode=memory for this run "
                    "(trainer.feature_cache.lock_timeout sets the wait)")

    def put(self, key: str, shape: tuple[int, ...], dtype: str, meta: dict,
            fill: Callable[[np.ndarray, np.ndarray], None],
            beat: Callable[[], None] = lambda: None) -> Entry:
        """Write entry ``key``: ``fill(features, labels)`` writes into memory-mapped arrays of
        ``shape`` in a temporary folder, which then replaces ``<root>/<key>`` in one rename
        (a bad entry there included). ``beat`` is called between the steps. A full disk
        raises ``OSError`` before anything is mapped."""
        self._remove_stale()
        tmp = self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{key}"
        tmp.mkdir(parents=True)
        try:
            features = np.lib.format.open_memmap(tmp / "features.npy", mode="w+",
                                                 dtype=np.dtype(dtype), shape=shape)
            reserve(tmp / "features.npy", features.offset)  # ENOSPC here, never SIGBUS later
            labels = np.zeros(shape[0], dtype=np.int64)
            fill(features, labels)
            features.flush()
            beat()
            sums = {"features": checksum(self.key, features),
                    "labels": checksum(self.key, labels)}
            del features
            np.save(tmp / "labels.npy", labels)
            meta = {**meta, "format": FORMAT, "shape": list(shape), "dtype": dtype,
                    "checksums": sums, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            for name in ("features.npy", "labels.npy", "meta.json"):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            beat()
            self._replace(tmp, self.root / key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry, bad = self.lookup(key, labels)
        if entry is None:
            raise UserError(f"the feature cache entry {self.root / key} cannot be read back "
                            f"({bad or 'absent'}): check the disk of trainer.feature_cache.dir, "
                            "or set trainer.feature_cache.mode=memory")
        return entry

    def _replace(self, tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final``; an entry already there (a bad one: the caller holds the
        lock and found it wanting) is renamed aside first and removed."""
        try:
            os.rename(tmp, final)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        aside = final.with_name(f".bad-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}")
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Temporary folders of extractions whose process is gone (killed, crashed)."""
        for tmp in [*self.root.glob(".tmp-*"), *self.root.glob(".bad-*")]:
            pid = tmp.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def reserve(path: Path, start: int = 0) -> None:
    """Allocate every block of ``path`` (at its current size) on disk: ``posix_fallocate``,
    else zeros written over it from ``start`` (the bytes before, a header, are kept). A full
    disk raises ``OSError`` (ENOSPC)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        zeros = bytes(min(_CHUNK, size))
        for at in range(start, size, _CHUNK):
            os.pwrite(fd, zeros[:min(_CHUNK, size - at)], at)
        os.fsync(fd)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, from the lock file: ``pid N on host H`` (and its state when it
    runs on this host and is stopped)."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        pid, host = "", ""
    if not pid.isdigit():
        return "another process"
    state = ""
    if host == socket.gethostname():
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rpartition(")")[2].split()[0] in ("T", "t"):
                state = f" (stopped: kill -CONT {pid}, or end it)"
    return f"pid {pid} on host {host}{state}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
