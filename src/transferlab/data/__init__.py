"""Datasets and loaders for a run: train/val splits, transforms from the backbone's input spec."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from transferlab.backbones import InputSpec
from transferlab.config import AugmentConfig, DatasetConfig, TrainerConfig
from transferlab.data.digits import CLASSES as DIGIT_CLASSES
from transferlab.data.digits import TensorImageDataset, digits_images
from transferlab.data.image_folder import ImageFileDataset, class_folders, index_folder
from transferlab.data.transforms import eval_transform, train_transform
from transferlab.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    """The train and val datasets of a run (transforms attached) and their class names."""

    train: Dataset
    val: Dataset
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files found but not used (not images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (keep, held_out) with ``fraction`` of every class held out, reproducible by seed."""
    indices = list(range(len(labels)))
    try:
        keep, held = train_test_split(indices, test_size=fraction, stratify=labels,
                                      random_state=seed)
    except ValueError as exc:
        raise UserError(f"cannot split {len(labels)} images with val_fraction={fraction} "
                        f"stratified by class ({exc})") from None
    return sorted(keep), sorted(held)


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


def _digits(cfg: DatasetConfig, train_tf, eval_tf) -> DataSplits:
    images, labels = digits_images()
    keep, held = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
    keep = [keep[i] for i in train_subset([labels[i] for i in keep], cfg)]
    pick = lambda idx: (images[idx], [labels[i] for i in idx])  # noqa: E731
    return DataSplits(
        train=TensorImageDataset(*pick(keep), transform=train_tf),
        val=TensorImageDataset(*pick(held), transform=eval_tf),
        classes=list(DIGIT_CLASSES),
    )


def _image_folder(cfg: DatasetConfig, train_tf, eval_tf) -> DataSplits:
    if not cfg.root:
        raise UserError(f"dataset {cfg.name} needs a folder: set dataset.root=/path/to/images")
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist: set dataset.root to a folder with "
                        "train/ and val/ class folders, or with class folders to split")
    subdirs = class_folders(root)
    if "train" in subdirs:
        if "val" not in subdirs:
            raise UserError(f"{root} has train/ but no val/: add val/<class>/ folders, or put the "
                            "class folders directly under the root to split them by val_fraction")
        train = index_folder(root / "train")
        val = index_folder(root / "val", classes=train.classes)
        skipped = train.skipped + val.skipped
        train_samples, val_samples, classes = train.samples, val.samples, train.classes
    else:
        index = index_folder(root)
        keep, held = stratified_split([y for _, y in index.samples], cfg.val_fraction,
                                      cfg.split_seed)
        train_samples = [index.samples[i] for i in keep]
        val_samples = [index.samples[i] for i in held]
        classes, skipped = index.classes, index.skipped
    if len(classes) < 2:
        raise UserError(f"{root} has {len(classes)} class folder(s): a classifier needs >= 2")
    train_samples = [train_samples[i] for i in train_subset([y for _, y in train_samples], cfg)]
    if skipped:
        log.warning("skipped %d file(s) that are not images (%s): %s", len(skipped),
                    ", ".join(sorted({p.suffix or p.name for p in skipped})),
                    ", ".join(str(p) for p in skipped[:5]))
    return DataSplits(
        train=ImageFileDataset(train_samples, transform=train_tf),
        val=ImageFileDataset(val_samples, transform=eval_tf),
        classes=classes,
        skipped=[str(p) for p in skipped],
    )


KINDS = {"digits": _digits, "image_folder": _image_folder}


def build_splits(cfg: DatasetConfig, augment: AugmentConfig, spec: InputSpec,
                 image_size: int) -> DataSplits:
    """The train/val datasets of ``cfg`` with transforms for ``spec`` at ``image_size``."""
    try:
        kind = KINDS[cfg.kind]
    except KeyError:
        raise UserError(f"unknown dataset.kind {cfg.kind!r}; choose one of {', '.join(KINDS)}") \
            from None
    train_tf = train_transform(spec, image_size, augment, cfg.crop_pct)
    eval_tf = eval_transform(spec, image_size, cfg.crop_pct)
    return kind(cfg, train_tf, eval_tf)


def default_num_workers() -> int:
    """One loader process per spare core, at most 8 (none on a single core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) - 1))


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loaders(splits: DataSplits, trainer: TrainerConfig, seed: int,
                 device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Shuffled, seeded train loader and ordered val loader."""
    workers = default_num_workers() if trainer.num_workers is None else trainer.num_workers
    common = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )
    bs = trainer.batch_size
    generator = torch.Generator().manual_seed(seed)
    # A last batch of one sample breaks BatchNorm in train mode: drop it, keep all others.
    train = DataLoader(splits.train, batch_size=bs, shuffle=True, generator=generator,
                       drop_last=len(splits.train) % bs == 1, **common)
    val = DataLoader(splits.val, batch_size=trainer.eval_batch_size or 2 * bs, shuffle=False,
                     **common)
    return train, val
