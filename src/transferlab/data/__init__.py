"""Datasets and loaders for a run: train/val splits, transforms from the backbone's input spec."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
)

from transferlab.backbones import InputSpec
from transferlab.config.schema import (
    AugmentConfig,
    CsvDatasetConfig,
    DatasetConfig,
    FakeDatasetConfig,
    FolderDatasetConfig,
    TorchvisionDatasetConfig,
    TrainerConfig,
)
from transferlab.data.digits import CLASSES as DIGIT_CLASSES
from transferlab.data.digits import TensorImageDataset, digits_images
from transferlab.data.image_folder import (
    ImageFileDataset,
    IndexedImages,
    class_folders,
    index_folder,
    read_csv_index,
)
from transferlab.data.torchvision_sets import load_torchvision_set
from transferlab.data.transforms import eval_transform, train_transform
from transferlab.errors import UserError
from transferlab.infra.distributed import World
from transferlab.infra.runtime import cache_root
from transferlab.registry import DATASETS

log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    """The train / val (/ test) datasets of a run, transforms attached, and their class names."""

    train: Dataset
    val: Dataset
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files found but not readable images
    test: Dataset | None = None
    train_labels: list[int] = field(default_factory=list)
    folds: dict | None = None  # k-fold CV: {k, fold, fold_seed, train, val}; val IS the fold

    def class_counts(self) -> list[int]:
        """Training images per class, in class order."""
        counts = [0] * len(self.classes)
        for y in self.train_labels:
            counts[y] += 1
        return counts

    def class_weights(self) -> torch.Tensor:
        """``n / (classes x count)`` per class: each class weighs the same in the loss."""
        counts = torch.tensor(self.class_counts(), dtype=torch.float32).clamp(min=1)
        return counts.sum() / (len(counts) * counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: list[int], fraction: float, seed: int,
                     what: str = "val_fraction",
                     names: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Indices (keep, held_out) with ``fraction`` of every class held out, reproducible by seed:
    scikit-learn's ``train_test_split`` (stratified), remembered on disk (:func:`_split_memo`)
    so that the next run of the same data skips importing scikit-learn and SciPy."""
    _check_two_each(labels, fraction, what, names)
    memo = _split_memo(labels, fraction, seed)
    if memo is not None and memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            return saved["keep"], saved["held"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: computed again, and written again
    indices = list(range(len(labels)))
    try:
        from sklearn.model_selection import train_test_split

        keep, held = train_test_split(indices, test_size=fraction, stratify=labels,
                                      random_state=seed)
    except ValueError as exc:
        raise UserError(f"cannot split {len(labels)} images with {what}={fraction} "
                        f"stratified by class ({exc})") from None
    keep, held = sorted(keep), sorted(held)
    if memo is not None:
        _write_memo(memo, {"keep": keep, "held": held})
    return keep, held


def _check_two_each(labels: list[int], fraction: float, what: str,
                    names: list[str] | None) -> None:
    """A stratified hold-out needs 2 images of every class: the classes short of them, by
    name (``names[label]``), in one line."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    short = sorted(y for y, n in counts.items() if n < 2)
    if short:
        said = ", ".join(repr(names[y]) if names else repr(y) for y in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise UserError(f"cannot split {len(labels)} images with {what}={fraction} stratified "
                        f"by class: class {said}{more} has 1 image, every class needs at least "
                        "2: add images or remove the class")


def _split_memo(labels: list[int], fraction: float, seed: int) -> Path | None:
    """The memo of a split: named by the digest of everything its indices depend on (the
    labels in order, the fraction, the seed and scikit-learn's version), so that it holds
    exactly what scikit-learn would compute. None where scikit-learn's version is unknown."""
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return None
    key = json.dumps([version, repr(float(fraction)), seed, [int(y) for y in labels]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_root() / "splits" / f"{digest}.json"


def _write_memo(path: Path, data: dict) -> None:
    """Whole or not at all (a temporary file renamed); a cache that cannot be written is
    skipped: the split is computed again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


def holdout(labels: list[int], cfg: DatasetConfig, val: bool = True, test: bool = True,
            names: list[str] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) indices: stratified, seeded hold-outs of ``val_fraction`` and
    ``test_fraction`` of the whole, for the splits the data does not have on its own."""
    train, held_val, held_test = list(range(len(labels))), [], []
    if val:
        train, held_val = stratified_split(labels, cfg.val_fraction, cfg.split_seed,
                                           names=names)
    if test and cfg.test_fraction > 0:
        share = cfg.test_fraction / ((1.0 - cfg.val_fraction) if val else 1.0)
        keep, out = stratified_split([labels[i] for i in train], share, cfg.split_seed,
                                     "test_fraction", names)
        train, held_test = [train[i] for i in keep], [train[i] for i in out]
    return train, held_val, held_test


def train_subset(labels: list[int], cfg: DatasetConfig) -> list[int]:
    """Indices of the training images a run uses: ``train_fraction`` of every class (at least
    one image each) or at most ``samples_per_class`` of each, drawn by ``subset_seed``."""
    if cfg.train_fraction >= 1.0 and cfg.samples_per_class is None:
        return list(range(len(labels)))
    rng = np.random.default_rng(cfg.subset_seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep: list[int] = []
    for _, members in sorted(by_class.items()):
        n = max(1, round(cfg.train_fraction * len(members)))
        if cfg.samples_per_class is not None:
            n = min(n, cfg.samples_per_class)
        keep.extend(members[i] for i in rng.permutation(len(members))[:n])
    return sorted(keep)


def fold_split(labels: list[int], folds: int, fold: int,
               seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) of fold ``fold`` of a stratified, shuffled ``folds``-fold split of
    ``labels``, drawn by ``seed`` (``dataset.fold_seed``): the val indices of the folds
    partition ``labels``, and every class's count differs by at most one between folds."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    few = sorted(y for y, n in counts.items() if n < folds)
    if few:
        raise UserError(f"dataset.folds={folds}: class {few[0]} has only {counts[few[0]]} "
                        f"training image(s), every class needs >= {folds}: lower dataset.folds "
                        "or raise train_fraction / samples_per_class")
    from sklearn.model_selection import StratifiedKFold

    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, val = list(kfold.split(np.zeros((len(labels), 1)), labels))[fold]
    return sorted(train.tolist()), sorted(val.tolist())


def check_classes(where: str, labels: list[int], classes: list[str]) -> None:
    """Every class must appear in every split a run trains or is measured on."""
    missing = sorted(set(range(len(classes))) - set(labels))
    if missing:
        names = ", ".join(classes[i] for i in missing[:5])
        raise UserError(f"the {where} split has no images of class(es) {names}: add some, or "
                        "lower train_fraction / raise samples_per_class")


def assemble(cfg: DatasetConfig, classes: list[str], make, train: list, val: list,
             test: list | None, label_of, train_tf, eval_tf,
             skipped: list | None = None) -> DataSplits:
    """DataSplits from per-split item lists: the training subset drawn, classes checked,
    ``make(items, transform)`` building each dataset."""
    if len(classes) < 2:
        raise UserError(f"dataset {cfg.name} has {len(classes)} class(es): a classifier "
                        "needs >= 2")
    train = [train[i] for i in train_subset([label_of(x) for x in train], cfg)]
    folds = None
    if cfg.folds is not None:  # subset first, then fold: the run's val IS fold ``cfg.fold``
        keep, held = fold_split([label_of(x) for x in train], cfg.folds, cfg.fold, cfg.fold_seed)
        log.info("k-fold: fold %d of %d (fold_seed %d) of the %d training images is the val set "
                 "(%d), the other folds train (%d); the data's own val (%d) and test (%d) "
                 "images are held out, unused", cfg.fold, cfg.folds, cfg.fold_seed, len(train),
                 len(held), len(keep), len(val), len(test or []))
        train, val, test = [train[i] for i in keep], [train[i] for i in held], None
        folds = {"k": cfg.folds, "fold": cfg.fold, "fold_seed": cfg.fold_seed,
                 "train": len(train), "val": len(val)}
    check_classes("train", [label_of(x) for x in train], classes)
    check_classes("val", [label_of(x) for x in val], classes)
    skipped = [str(p) for p in (skipped or [])]
    if skipped:
        log.warning("skipped %d file(s) that are not readable images: %s%s", len(skipped),
                    ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
    return DataSplits(train=make(train, train_tf), val=make(val, eval_tf), classes=classes,
                      skipped=skipped, test=make(test, eval_tf) if test else None,
                      train_labels=[label_of(x) for x in train], folds=folds)


def _digits(cfg: DatasetConfig, train_tf, eval_tf) -> DataSplits:
    images, labels = digits_images()
    train, val, test = holdout(labels, cfg)
    make = lambda idx, tf: TensorImageDataset(images[idx], [labels[i] for i in idx], tf)  # noqa: E731
    return assemble(cfg, list(DIGIT_CLASSES), make, train, val, test, labels.__getitem__,
                    train_tf, eval_tf)


def _folder_root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise UserError(f"dataset {cfg.name} needs a folder: set dataset.root=/path/to/images")
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist: set dataset.root to a folder with "
                        "train/ and val/ class folders, or with class folders to split")
    return root


def _image_folder(cfg: FolderDatasetConfig, train_tf, eval_tf) -> DataSplits:
    root = _folder_root(cfg)
    subdirs = class_folders(root)
    make = lambda samples, tf: ImageFileDataset(samples, tf)  # noqa: E731
    label_of = lambda sample: sample[1]  # noqa: E731
    if "train" in subdirs:
        if "val" not in subdirs:
            raise UserError(f"{root} has train/ but no val/: add val/<class>/ folders, or put the "
                            "class folders directly under the root to split them by val_fraction")
        train = index_folder(root / "train")
        val = index_folder(root / "val", classes=train.classes)
        skipped = train.skipped + val.skipped
        test_samples = None
        if "test" in subdirs:
            test = index_folder(root / "test", classes=train.classes)
            test_samples, skipped = test.samples, skipped + test.skipped
        elif cfg.test_fraction > 0:
            keep, _, out = holdout([y for _, y in train.samples], cfg, val=False,
                                   names=train.classes)
            train.samples, test_samples = ([train.samples[i] for i in keep],
                                           [train.samples[i] for i in out])
        return assemble(cfg, train.classes, make, train.samples, val.samples, test_samples,
                        label_of, train_tf, eval_tf, skipped)
    index = index_folder(root)
    train_idx, val_idx, test_idx = holdout([y for _, y in index.samples], cfg,
                                           names=index.classes)
    pick = lambda idx: [index.samples[i] for i in idx]  # noqa: E731
    return assemble(cfg, index.classes, make, pick(train_idx), pick(val_idx), pick(test_idx),
                    label_of, train_tf, eval_tf, index.skipped)


def _csv(cfg: CsvDatasetConfig, train_tf, eval_tf) -> DataSplits:
    root = _folder_root(cfg)
    table = read_csv_index(root, cfg.csv_file, cfg.x_col, cfg.y_col, cfg.allow_outside_root)
    train_idx, val_idx, test_idx = holdout([y for _, y in table.samples], cfg,
                                           names=table.classes)
    pick = lambda idx: [table.samples[i] for i in idx]  # noqa: E731
    return assemble(cfg, table.classes, lambda samples, tf: ImageFileDataset(samples, tf),
                    pick(train_idx), pick(val_idx), pick(test_idx), lambda s: s[1],
                    train_tf, eval_tf, table.skipped)


def _torchvision(cfg: TorchvisionDatasetConfig, train_tf, eval_tf) -> DataSplits:
    source = load_torchvision_set(cfg)
    labels = source.labels
    if source.val is None:  # hold out val (and test, when the set has none) from train
        train, val, test = holdout(labels, cfg, test=source.test is None)
        items = lambda idx: [(source.train, i) for i in idx]  # noqa: E731
        train_items, val_items = items(train), items(val)
        test_items = items(test) if source.test is None else _all(source.test)
    else:
        train_items, val_items = _all(source.train), _all(source.val)
        test_items = _all(source.test) if source.test is not None else None
    label_of = lambda item: source.label_of(*item)  # noqa: E731
    make = lambda items, tf: IndexedImages(items, source.label_of, tf)  # noqa: E731
    return assemble(cfg, source.classes, make, train_items, val_items, test_items, label_of,
                    train_tf, eval_tf)


def _all(dataset) -> list[tuple]:
    return [(dataset, i) for i in range(len(dataset))]


def _fake(cfg: FakeDatasetConfig, train_tf, eval_tf) -> DataSplits:
    from torchvision.datasets import FakeData

    side = cfg.image_size or 64
    data = FakeData(size=cfg.size, image_size=(3, side, side), num_classes=cfg.num_classes,
                    random_offset=cfg.split_seed)
    labels = [int(data[i][1]) for i in range(len(data))]
    train, val, test = holdout(labels, cfg)
    make = lambda idx, tf: IndexedImages([(data, i) for i in idx], lambda d, i: labels[i], tf)  # noqa: E731
    return assemble(cfg, [f"class_{i}" for i in range(cfg.num_classes)], make, train, val,
                    test, labels.__getitem__, train_tf, eval_tf)


def build_splits(cfg: DatasetConfig, augment: AugmentConfig, spec: InputSpec,
                 image_size: int, eval_tf: Callable | None = None) -> DataSplits:
    """The train/val datasets of ``cfg`` with transforms for ``spec`` at ``image_size``;
    ``eval_tf`` replaces the eval transform (test-time augmentation's views)."""
    kind = DATASETS.builder(cfg.kind)
    train_tf = train_transform(spec, image_size, augment, cfg.crop_pct)
    if eval_tf is None:
        eval_tf = eval_transform(spec, image_size, cfg.crop_pct)
    return kind(cfg, train_tf, eval_tf)


def loader_workers(trainer: TrainerConfig) -> int:
    return default_num_workers() if trainer.num_workers is None else trainer.num_workers


def worker_context():
    """The start method of loader processes: the default one, except inside a joblib (loky)
    worker, whose default context cannot start them (``'Process' object has no attribute
    'env'``): there, ``fork`` where the platform has it."""
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) == "loky" \
            and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def default_num_workers() -> int:
    """One loader process per spare core, at most 8 (none on a single core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) - 1))


def _seed_worker(worker_id: int) -> None:
    """A loader process's start: seeded, and deaf to SIGTERM. A SIGTERM to the run's whole
    process group (``timeout``, SLURM's ``scancel``, a container's stop) is the main
    process's to act on: it finishes the step and saves its checkpoint, then ends its loader
    processes itself. Torch's own SIGTERM handler would end them at once, and their death
    would raise in the main process in the middle of that checkpoint (the job: failed).
    A loader process still ends when the main process dies (torch watches for that), and
    when it exits with the loader still running (:func:`_end_loader_processes`)."""
    import random
    import signal

    import numpy as np

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _end_loader_processes() -> None:
    """At the main process's exit, its daemonic processes still running (loader processes of
    an iterator alive to the end, e.g. persistent workers) are killed. multiprocessing's exit
    handler would send them SIGTERM, which loader processes ignore (:func:`_seed_worker`),
    and then wait for them forever."""
    import multiprocessing
    import signal

    ending = [p for p in multiprocessing.active_children() if p.daemon]
    if ending:  # torch's SIGCHLD handler would raise for each (the process is ending anyway)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in ending:
        process.kill()
        process.join(timeout=5)


# multiprocessing's exit handler runs its finalizers of priority >= 0 before it sends its
# children SIGTERM and joins them
importlib.import_module("multiprocessing.util").Finalize(None, _end_loader_processes,
                                                         exitpriority=100)


class SampleIndex(int):
    """A dataset index that knows its epoch: what :class:`SeededSamples` seeds a sample's
    augmentation with (it travels to loader processes with the index)."""

    epoch: int

    def __new__(cls, index: int, epoch: int):
        obj = super().__new__(cls, index)
        obj.epoch = epoch
        return obj

    def __reduce__(self):
        return (SampleIndex, (int(self), self.epoch))


class ResumableSampler(Sampler):
    """The training order, epoch by epoch: epoch ``e``'s order is drawn from a generator seeded
    by (seed, e) alone (:meth:`set_epoch` before each epoch). It does not depend on how often
    the loader started an iteration (worker processes prefetch), on the number of workers or
    on earlier epochs, so a loader over cached features that shares this sampler draws the
    very same batches, and a resumed run draws the epoch it stopped in again. It yields
    :class:`SampleIndex` values (indices that carry the epoch).

    Under DDP (``world`` of N processes) it is the distributed sampler: every process draws
    the same order, pads it to a multiple of N with its first indices (as PyTorch's
    ``DistributedSampler``) and takes every N-th index from its rank on. Batch k of the N
    processes together is then batch k of one process with an N times larger batch.

    ``skip_batches`` leaves out the first batches of the epoch (a run resumed from a
    checkpoint written mid-epoch); the caller sets it back to 0 after that epoch."""

    def __init__(self, sampler: Sampler, batch_size: int, generator: torch.Generator,
                 seed: int, world: World | None = None):
        self.sampler, self.batch_size, self.generator = sampler, batch_size, generator
        self.seed, self.epoch = seed, 1
        self.world = world or World()
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        self.generator.manual_seed(derived_seed("order", self.seed, epoch))
        indices = iter(self.sampler)
        if self.world.active:
            order = list(indices)
            total = len(self) * self.world.size
            order = (order * math.ceil(total / max(len(order), 1)))[:total]
            indices = iter(order[self.world.rank::self.world.size])
        for _ in range(self.skip_batches * self.batch_size):
            next(indices, None)
        for i in indices:
            yield SampleIndex(i, epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.world.size)


class SeededSamples(Dataset):
    """The training split, each sample's random augmentation drawn from an RNG seeded by
    (seed, epoch, index) alone: the same images whatever the number of loader processes, the
    launcher or the job's place in a sweep, and again after a resume. The process's own RNG
    states are left as they were (the main process trains with them)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        with sample_rngs(self.seed, getattr(i, "epoch", 0), int(i)):
            return self.dataset[int(i)]

    def __getitems__(self, indices: list) -> SeededBatch:
        """A batch's samples, with the epoch and indices that seed a batch-level draw (MixUp /
        CutMix in the collate function, :mod:`transferlab.data.mixup`)."""
        epoch = getattr(indices[0], "epoch", 0) if indices else 0
        return SeededBatch([self[i] for i in indices], epoch, [int(i) for i in indices])


@contextlib.contextmanager
def sample_rngs(seed: int, epoch: int, index: int):
    """Torch's, Python's and NumPy's RNGs seeded by (seed, epoch, index) for the block (a
    sample's random augmentation); the process's own states are restored after it."""
    import random

    drawn = derived_seed("sample", seed, epoch, index)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(drawn)
        random.seed(drawn)
        np.random.seed(drawn % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededBatch(list):
    """A batch's samples (a list) with the epoch and the dataset indices they were drawn at."""

    def __init__(self, samples: list, epoch: int, indices: list[int]):
        super().__init__(samples)
        self.epoch, self.indices = epoch, indices


def derived_seed(what: str, *parts: int) -> int:
    """A well-mixed 63-bit seed of ``parts`` (``what`` keeps the uses apart)."""
    import hashlib

    text = ":".join(["transferlab", what, *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def make_loaders(splits: DataSplits, trainer: TrainerConfig, seed: int, device: torch.device,
                 collate: Callable | None = None,
                 world: World | None = None) -> tuple[DataLoader, DataLoader]:
    """Shuffled, seeded train loader (``collate``: its collate function, e.g. MixUp) and
    ordered val loader. Under DDP (``world``) each process loads its share: of every epoch's
    order (padded, :class:`ResumableSampler`) and of the val split (every image on exactly
    one process, no padding: the summed metrics count each once)."""
    world = world or World()
    workers = loader_workers(trainer)
    common = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
        multiprocessing_context=worker_context() if workers > 0 else None,
    )
    bs = trainer.batch_size
    val_order = (dict(sampler=world.shard(len(splits.val))) if world.active
                 else dict(shuffle=False))
    val = DataLoader(splits.val, batch_size=eval_batch_size(trainer),
                     generator=_loader_generator(seed), **val_order, **common)
    if isinstance(splits.train, IterableDataset):  # streamed: it orders and shares itself out
        return streamed_loader(splits.train, trainer, seed, world, collate, common), val
    order_generator = torch.Generator().manual_seed(seed)
    if trainer.sampler == "balanced":  # every class drawn equally often, with replacement
        per_class = splits.class_counts()
        weights = [1.0 / per_class[y] for y in splits.train_labels]
        order: Sampler = WeightedRandomSampler(weights, len(weights), replacement=True,
                                               generator=order_generator)
    else:
        order = RandomSampler(splits.train, generator=order_generator)
    sampler = ResumableSampler(order, bs, order_generator, seed, world)
    # A last batch of one sample breaks BatchNorm in train mode: drop it, keep all others.
    # The loader's own generator gives its worker processes their base seeds (and keeps the
    # global RNG untouched when there are none).
    train = DataLoader(SeededSamples(splits.train, seed), batch_size=bs,
                       generator=_loader_generator(seed), sampler=sampler,
                       drop_last=len(sampler) % bs == 1, collate_fn=collate, **common)
    return train, val


def streamed_loader(stream, trainer: TrainerConfig, seed: int, world: World,
                    collate: Callable | None, common: dict) -> DataLoader:
    """The loader of a streamed training split (``dataset.stream=true``,
    :class:`~transferlab.data.shards.ShardStream`): this process's share of every epoch, in
    batches that each loader worker reads whole. Its workers are started again every epoch
    (not persistent): they take the epoch (and a resume's skipped batches) from the stream as
    the main process set it. Batches are :class:`SeededBatch` es, so that MixUp / CutMix draw
    by (seed, epoch, samples) as they do for a split read by index."""
    if trainer.sampler == "balanced":
        raise UserError("trainer.sampler=balanced draws images by index, and a streamed "
                        "training split (dataset.stream=true) is read in order: use "
                        "trainer.class_weights=balanced, or dataset.stream=false")
    share = stream.shared(seed, trainer.batch_size, world.rank if world.active else 0,
                          world.size if world.active else 1)
    return DataLoader(share, batch_size=trainer.batch_size, collate_fn=StreamedBatch(collate),
                      **{**common, "persistent_workers": False})


class StreamedBatch:
    """A streamed split's collate function: its ``(x, y, epoch, index)`` items as a
    :class:`SeededBatch` of ``(x, y)``, through ``collate`` (the default one when None). A
    class, not a closure: loader processes started by spawn or forkserver unpickle it."""

    def __init__(self, collate: Callable | None):
        self.collate = collate or torch.utils.data.default_collate

    def __call__(self, items):
        epoch = items[0][2] if items else 0
        return self.collate(SeededBatch([(x, y) for x, y, _, _ in items], epoch,
                                        [index for _, _, _, index in items]))


def epoch_order(loader: DataLoader):
    """What orders ``loader``'s epochs: its :class:`ResumableSampler`, or the streamed split
    itself (both have ``set_epoch`` and ``skip_batches``); None for another loader."""
    if isinstance(loader.dataset, IterableDataset):
        return loader.dataset
    return loader.sampler if hasattr(loader.sampler, "set_epoch") else None


def eval_batch_size(trainer: TrainerConfig) -> int:
    return trainer.eval_batch_size or 2 * trainer.batch_size


def _loader_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + 0x5EED)
