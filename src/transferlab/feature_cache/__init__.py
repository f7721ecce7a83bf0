"""The frozen-prefix feature cache: a stage whose input end is frozen and deterministic trains
on that part's stored outputs instead of decoding every image and running it every epoch.

At the start of each stage, :func:`~transferlab.feature_cache.cut.find_cut` finds the longest
deterministic prefix of the backbone; the train and val splits' outputs of that prefix are
taken from memory, from the disk store (:mod:`~transferlab.feature_cache.store`, shared by
every run and sweep job) or extracted once (one forward pass). The stage then trains the rest
(the unfrozen blocks and the head) on them with the same sampler, batches, loss and records as
the uncached path: only the speed, a log line and ``metrics.json["feature_cache"]`` tell.

``trainer.feature_cache.mode``: ``auto`` (the disk store; memory only when it cannot be
written), ``disk`` (the store, or an error), ``memory`` (this run only), ``off``.

Under DDP the processes agree on every choice (cache or not, hit or miss); an extraction is
sharded: each process runs the prefix over its share of the split, and all gather the whole
once (:meth:`~transferlab.infra.distributed.World.gather_rows`); the first process of each node
writes the store's entry.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from transferlab.backbones import Backbone
from transferlab.config.schema import CacheIdentity, CacheMode, FeatureCacheConfig, TrainerConfig
from transferlab.data import DataSplits, eval_batch_size, loader_workers, worker_context
from transferlab.errors import UserError
from transferlab.feature_cache.cut import Cut, find_cut
from transferlab.feature_cache.identity import dataset_identity, dataset_labels, tensors_hash
from transferlab.feature_cache.store import FORMAT, DiskStore, Held, LockUnavailable, default_dir
from transferlab.infra.distributed import World
from transferlab.infra.runtime import Precision

log = logging.getLogger("transferlab")

__all__ = ["CachedFeatures", "Cut", "FeatureCache", "StageInputs", "extract_splits", "find_cut"]


class CachedFeatures(Dataset):
    """A split's cached features and labels; a batch is one gather (``__getitems__``)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.features[i].float(), self.labels[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, device=self.features.device)
        return self.features[idx].float(), self.labels[idx]


def _batch(batch):  # __getitems__ gives the batch itself
    return batch


class CutModel(nn.Module):
    """The stage's model after the cut: the remainder of the backbone's chain, then the head.
    Its modules are the run model's own (shared), so training it trains the run's model."""

    def __init__(self, cut: Cut, head: nn.Module):
        super().__init__()
        self.steps = [s.fn for s in cut.remainder]
        self.remainder = nn.ModuleList(s.module for s in cut.remainder if s.module is not None)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return self.head(x)


@dataclass
class StageInputs:
    """What a cached stage trains on: loaders of cached features and the model after the cut."""

    train: DataLoader
    val: DataLoader
    model: nn.Module


@dataclass
class _Split:
    features: torch.Tensor
    labels: torch.Tensor
    source: str  # memory | disk | extracted
    seconds: float


class FeatureCache:
    """The cache of one run: entries in memory for the run, and the disk store."""

    def __init__(self, cfg: FeatureCacheConfig, device: torch.device, precision: Precision,
                 channels_last: bool, batch_size: int, workers: int, world: World | None = None):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.channels_last, self.batch_size, self.workers = channels_last, batch_size, workers
        self.world = world or World()  # DDP: the processes that share the extractions
        self.memory: dict[str, _Split] = {}
        self.view: dict = {}
        self.report: dict[str, dict] = {}
        self.store: DiskStore | None = None
        if cfg.mode in (CacheMode.auto, CacheMode.disk):
            store = DiskStore(cfg.dir or default_dir(), cfg.lock_timeout)
            why = self.world.first(_unusable(store))  # DDP: all use the store, or none
            if why is None:
                self.store = store
            elif cfg.mode == CacheMode.disk:
                raise UserError(f"trainer.feature_cache.mode=disk: {why}: set "
                                "trainer.feature_cache.dir to a writable folder, or mode=memory")
            else:
                log.warning("feature cache: %s: entries are kept in memory for this run only "
                            "(set trainer.feature_cache.dir to share them)", why)

    @property
    def enabled(self) -> bool:
        return self.cfg.mode != CacheMode.off

    # -- a training stage ------------------------------------------------------------------
    def stage_inputs(self, stage: str, model: nn.Module, backbone: Backbone, image_size: int,
                     splits, train_loader: DataLoader, val_loader: DataLoader,
                     random_inputs: str | None) -> StageInputs | None:
        """The stage's cached inputs, or None (the uncached path); logs one line either way.
        ``model`` has the stage's ``requires_grad`` and modes; ``random_inputs`` says why the
        training images are random (an augmentation), or is None."""
        if not self.enabled:
            return None
        if random_inputs:
            return self._skip(stage, f"not cached: {random_inputs}")
        if isinstance(splits.train, IterableDataset):  # no index to key its features by
            return self._skip(stage, "not cached: the training split is streamed "
                                     "(dataset.stream=true)")
        cut, why = find_cut(model, backbone, image_size, self.view)
        if cut is None:
            return self._skip(stage, why)
        got = self._splits(stage, cut, backbone, model, image_size,
                           {"train": splits.train, "val": splits.val}, why)
        if got is None:
            return None
        train_set = CachedFeatures(got["train"].features, got["train"].labels)
        val_set = CachedFeatures(got["val"].features, got["val"].labels)
        # the image loader's own sampler: the same generator, so the very same batches
        train = DataLoader(train_set, batch_size=train_loader.batch_size,
                           sampler=train_loader.sampler, drop_last=train_loader.drop_last,
                           collate_fn=_batch, generator=torch.Generator())
        val = DataLoader(val_set, batch_size=val_loader.batch_size, sampler=val_loader.sampler,
                         collate_fn=_batch, generator=torch.Generator())  # DDP: its share
        return StageInputs(train, val, CutModel(cut, model.head))

    def _skip(self, stage: str, why: str) -> None:
        log.info("feature cache [%s]: %s", stage, why)
        self.report[stage] = {"cut": None, "reason": why}
        return None

    # -- classical heads and transferlab-features: the pooled whole backbone ----------------
    def pooled_features(self, backbone: Backbone, image_size: int, parts: dict[str, Dataset],
                        stage: str = "features") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per split: (features (N, D) float32, labels (N,)), the backbone's output globally
        average-pooled, through the cache (``parts`` take the eval transform)."""
        streamed = [name for name, d in parts.items() if isinstance(d, IterableDataset)]
        if streamed:
            raise UserError(f"{stage}: the {streamed[0]} split is streamed (dataset.stream=true) "
                            "and its features are read by index: use dataset.stream=false")
        pooled = len(backbone.feature_shape) == 3
        cut = Cut([], None, pooled, backbone.blocks[-1].name if backbone.blocks else "")
        module = backbone.module.to(self.device).eval()
        if not self.enabled:
            out = {}
            for name, dataset in parts.items():
                feats, labels = self._extracted(cut, _prefix_fn(cut, module, module), dataset,
                                                self._shape(cut, backbone, image_size),
                                                torch.float32)
                out[name] = (feats.numpy(), labels.numpy())
            return out
        got = self._splits(stage, cut, backbone, module, image_size, parts,
                           f"cached {cut.describe()}")
        if got is None:
            raise UserError(f"the features cannot be cached ({self.report[stage]['reason']}): "
                            "set trainer.feature_cache.mode=off to extract them without it")
        return {name: (s.features.float().cpu().numpy(), s.labels.cpu().numpy())
                for name, s in got.items()}

    # -- entries ---------------------------------------------------------------------------
    def _splits(self, stage: str, cut: Cut, backbone: Backbone, model: nn.Module,
                image_size: int, parts: dict[str, Dataset], why: str) -> dict[str, _Split] | None:
        started = time.perf_counter()
        content = self.cfg.identity == CacheIdentity.content
        identities = {name: dataset_identity(ds, content) for name, ds in parts.items()}
        unknown = [name for name, ident in identities.items() if ident is None]
        if unknown:
            kind = type(parts[unknown[0]]).__name__
            return self._skip(stage, f"not cached: the {kind} dataset has no cache identity")
        shape = self._shape(cut, backbone, image_size)
        itemsize = np.dtype(self.cfg.dtype).itemsize
        total = sum(len(ds) for ds in parts.values()) * int(np.prod(shape)) * itemsize
        too_big = self.world.first(self._too_big(total))  # DDP: one choice for all
        if too_big:
            return self._skip(stage, f"not cached: {cut.describe()} gives {len(parts)} splits of "
                              f"{tuple(shape)} {self.cfg.dtype} features, {total / 1e9:.2f} GB: "
                              f"{too_big}")
        weights = tensors_hash([("backbone", backbone.module)] if cut.whole else
                               [(s.path, s.module) for s in cut.prefix if s.module is not None])
        base = {"format": FORMAT, "backbone": backbone.name,
                "module": f"{type(backbone.module).__module__}."
                          f"{type(backbone.module).__qualname__}",
                "weights": weights, "cut": cut.identity(), "dtype": self.cfg.dtype,
                "device": self.device.type, "channels_last": self.channels_last,
                "autocast": str(self.precision.dtype) if self.precision.enabled else None,
                "torch": torch.__version__,
                "signer": self.store.signer if self.store else None}
        run_prefix = _prefix_fn(cut, backbone.module, model)
        got = {}
        for name, dataset in parts.items():
            key_parts = {**base, "data": identities[name], "split": len(dataset)}
            got[name] = self._entry(key_parts, run_prefix, cut, dataset, shape)
        seconds = time.perf_counter() - started
        nbytes = sum(int(s.features.nelement()) * itemsize for s in got.values())
        where = str(self.store.root) if self.store else "memory"
        self.report[stage] = {
            "cut": cut.describe(), "shape": list(shape), "dtype": self.cfg.dtype,
            "store": where, "bytes": nbytes, "seconds": round(seconds, 3),
            "hits": sum(s.source != "extracted" for s in got.values()),
            "misses": sum(s.source == "extracted" for s in got.values()),
            "splits": {name: s.source for name, s in got.items()}}
        states = ", ".join(f"{name} {len(s.labels)} " + (
            "extracted" if s.source == "extracted" else f"hit ({s.source})")
            for name, s in got.items())
        log.info("feature cache [%s]: %s; %s; %s %s, %.1f MB in %s, %.1fs", stage, why, states,
                 tuple(shape), self.cfg.dtype, nbytes / 1e6, where, seconds)
        return got

    def _entry(self, key_parts: dict, run_prefix, cut: Cut, dataset: Dataset,
               shape: tuple[int, ...]) -> _Split:
        import hashlib
        import json

        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:40]
        if key in self.memory:
            hit = self.memory[key]
            return _Split(hit.features, hit.labels, "memory", 0.0)
        started = time.perf_counter()
        split = None
        if self.store is not None and self.world.active:
            split = self._shared_entry(key, key_parts, run_prefix, cut, dataset, shape)
        elif self.store is not None:
            split = self._stored_entry(key, key_parts, run_prefix, cut, dataset, shape)
        if split is None:  # memory only (mode=memory, or the store cannot be used)
            features, labels = self._extracted(cut, run_prefix, dataset, shape,
                                               getattr(torch, self.cfg.dtype))
            split = _Split(features, labels, "extracted", time.perf_counter() - started)
        split = self._to_device(split)
        self.memory[key] = split
        return split

    def _stored_entry(self, key: str, key_parts: dict, run_prefix, cut: Cut, dataset: Dataset,
                      shape: tuple[int, ...]) -> _Split | None:
        """The store's entry: read and checked, or (absent or bad) extracted under its lock
        and written, replacing a bad one. None when its lock cannot be taken and mode=auto
        (one warning: the split is extracted in memory for this run)."""
        started = time.perf_counter()
        expected = dataset_labels(dataset)
        entry, bad = self.store.lookup(key, expected, _read_below())
        source = "disk"
        if entry is None:
            try:
                with self.store.lock(key) as held:
                    entry, bad_now = self.store.lookup(key, expected, _read_below())
                    if entry is None:
                        source = "extracted"
                        if bad or bad_now:
                            log.warning("feature cache: entry %s is bad (%s): extracting it "
                                        "again", self.store.root / key, bad or bad_now)
                        entry = self._write(key, key_parts, run_prefix, cut, dataset, shape,
                                            held)
            except LockUnavailable as exc:
                if self.cfg.mode == CacheMode.disk:
                    raise UserError(f"trainer.feature_cache.mode=disk: {exc}: make it a file "
                                    "you can write (or delete it), set trainer.feature_cache.dir "
                                    "to a folder of your own, or mode=memory") from None
                log.warning("feature cache: %s: this split's features are kept in memory for "
                            "this run only", exc)
                return None
        return _Split(*self._load(entry), source, time.perf_counter() - started)

    def _write(self, key: str, key_parts: dict, run_prefix, cut: Cut, dataset: Dataset,
               shape: tuple[int, ...], held: Held | None):
        """Extract ``dataset`` into the store's entry ``key`` (the caller holds its lock); a
        disk that cannot take it (full, over quota, read-only) is a one-line error (an image
        that cannot be read is not this: its error passes)."""
        beat = held.beat if held is not None else _nothing

        def fill(features: np.ndarray, labels: np.ndarray) -> None:
            self._extract(cut, run_prefix, dataset, torch.from_numpy(features),
                          torch.from_numpy(labels), beat)

        try:
            return self.store.put(key, (len(dataset), *shape), self.cfg.dtype,
                                  {"key": key_parts}, fill, beat)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            raise UserError(f"feature cache: cannot write an entry in {self.store.root} "
                            f"({exc.strerror or exc}): free space there, set "
                            "trainer.feature_cache.dir to another folder, or "
                            "trainer.feature_cache.mode=memory") from None

    def _shared_entry(self, key: str, key_parts: dict, run_prefix, cut: Cut, dataset: Dataset,
                      shape: tuple[int, ...]) -> _Split:
        """DDP: the store's entry when every process finds it; else extracted by all the
        processes together (:meth:`_extracted`), then written into the store by the first
        process of each node (the others wait for it)."""
        started = time.perf_counter()
        expected = dataset_labels(dataset)
        entry, bad = self.store.lookup(key, expected, _read_below())
        if self.world.all(entry is not None):
            return _Split(*self._load(entry), "disk", time.perf_counter() - started)
        if bad and self.world.main:
            log.warning("feature cache: entry %s is bad (%s): extracting it again",
                        self.store.root / key, bad)
        features, labels = self._extracted(cut, run_prefix, dataset, shape,
                                           getattr(torch, self.cfg.dtype))
        if self.world.local_rank == 0:
            def fill(into: np.ndarray, into_labels: np.ndarray) -> None:
                into[:] = features.numpy()
                into_labels[:] = labels.numpy()

            try:  # a failure here must not stop this process alone (the others would wait)
                with self.store.lock(key) as held:
                    if self.store.get(key, expected) is None:
                        self.store.put(key, (len(dataset), *shape), self.cfg.dtype,
                                       {"key": key_parts}, fill,
                                       held.beat if held is not None else _nothing)
            except (LockUnavailable, OSError, UserError) as exc:
                log.warning("feature cache: entry %s not written (%s): the run goes on with "
                            "its features in memory", key[:12], exc)
        self.world.barrier()
        return _Split(features, labels, "extracted", time.perf_counter() - started)

    def _extracted(self, cut: Cut, run_prefix, dataset: Dataset, shape: tuple[int, ...],
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and labels of ``dataset``, extracted: under DDP each process runs its
        share of the images (:meth:`~transferlab.infra.distributed.World.shard`) and every process
        gathers the whole once."""
        world = self.world
        part = Subset(dataset, world.shard(len(dataset))) if world.active else dataset
        features = torch.zeros((len(part), *shape), dtype=dtype)
        labels = torch.zeros(len(part), dtype=torch.long)
        self._extract(cut, run_prefix, part, features, labels)
        return world.gather_rows(features, len(dataset)), world.gather_rows(labels, len(dataset))

    def _load(self, entry) -> tuple[torch.Tensor, torch.Tensor]:
        """The entry's tensors: read into memory when it is small next to the available
        memory (:func:`_read_below`; the store's lookup may have read it), else left
        memory-mapped (pages read as batches ask for them)."""
        features = entry.features
        if isinstance(features, np.memmap) and entry.nbytes < _read_below():
            features = np.array(features)  # one read
        return torch.from_numpy(features), torch.from_numpy(np.asarray(entry.labels))

    def _to_device(self, split: _Split) -> _Split:
        """On CUDA: the tensors moved to the GPU once, when they take under a quarter of its
        free memory."""
        if self.device.type != "cuda":
            return split
        free, _ = torch.cuda.mem_get_info(self.device)
        if split.features.nelement() * split.features.element_size() < free // 4:
            split.features = split.features.to(self.device)
            split.labels = split.labels.to(self.device)
        return split

    def _too_big(self, total: int) -> str | None:
        cap = self.cfg.max_gb * 1e9
        if total > cap:
            return f"above trainer.feature_cache.max_gb={self.cfg.max_gb:g}"
        if self.store is not None:
            free = self.store.free_bytes()
            if total > 0.9 * free:
                return f"the cache folder {self.store.root} has {free / 1e9:.2f} GB free"
        else:
            available = _available_memory()
            if available is not None and total > available // 2:
                return f"above half the available memory ({available / 1e9:.2f} GB)"
        return None

    def _shape(self, cut: Cut, backbone: Backbone, image_size: int) -> tuple[int, ...]:
        """One sample's cached shape."""
        if cut.whole:
            return (backbone.feature_shape[0],) if cut.pooled else tuple(backbone.feature_shape)
        x = torch.zeros(1, 3, image_size, image_size, device=_device_of(backbone.module))
        with torch.no_grad():
            for seg in cut.prefix:
                x = seg.fn(x)
        return tuple(x.shape[1:])

    def _extract(self, cut: Cut, run_prefix, dataset: Dataset, features: torch.Tensor,
                 labels: torch.Tensor, beat=None) -> None:
        """One forward pass of the prefix over ``dataset``, in order, into ``features``;
        ``beat()`` after every batch (the lock's sign of life)."""
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            multiprocessing_context=worker_context() if self.workers else None,
                            generator=torch.Generator())
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        start = 0
        with torch.no_grad():
            for x, y in loader:
                x = x.to(self.device, non_blocking=self.device.type == "cuda",
                         memory_format=fmt if x.ndim == 4 else torch.contiguous_format)
                with self.precision.autocast():
                    out = run_prefix(x)
                n = out.shape[0]
                features[start:start + n] = out.to("cpu", features.dtype)
                labels[start:start + n] = torch.as_tensor(y)
                start += n
                if beat is not None:
                    beat()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _nothing() -> None:
    pass


def _unusable(store: DiskStore) -> str | None:
    """Why ``store`` cannot be used (its folder not writable, this user's key not readable),
    or None."""
    why = store.check_writable()
    if why is None:
        try:
            store.signer  # noqa: B018 (reads, or makes, this user's key)
        except OSError as exc:
            why = (f"cannot read or make this user's feature cache key {exc.filename} "
                   f"({exc.strerror or exc}; XDG_CONFIG_HOME chooses its folder)")
    return why


def _read_below() -> int:
    """Entries of fewer bytes are read into memory: a quarter of the available memory."""
    available = _available_memory()
    return sys.maxsize if available is None else available // 4


def _prefix_fn(cut: Cut, module: nn.Module, model: nn.Module):
    """x -> the prefix's output (pooled as the head pools it, where the cut says so)."""
    pool = next(iter(model.head.children())) if cut.pooled and hasattr(model, "head") else None
    steps = [s.fn for s in cut.prefix] if not cut.whole else [module]

    def run(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        if cut.pooled:
            x = pool(x) if pool is not None else x.mean(dim=(2, 3))
        return x

    return run


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def extract_splits(backbone: Backbone, splits: DataSplits, trainer: TrainerConfig,
                   device: torch.device, image_size: int,
                   cache: FeatureCache | None = None,
                   stage: str = "features") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split (train, val and test where there is one): its (features (N, D) float32,
    labels (N,)), through the feature cache (``trainer.feature_cache``): stored in its dtype
    (float16 by default), taken from the store when an earlier run or export made them."""
    if cache is None:
        cache = FeatureCache(trainer.feature_cache, device, Precision(device, trainer.amp),
                             trainer.channels_last and len(backbone.feature_shape) == 3,
                             eval_batch_size(trainer), loader_workers(trainer))
    parts = {"train": splits.train, "val": splits.val}
    if splits.test is not None:
        parts["test"] = splits.test
    return cache.pooled_features(backbone, image_size, parts, stage)
