"""torchvision's classic datasets (CIFAR, MNIST, Flowers102, ...), downloaded to ``root``.

Each set keeps its own splits where it has them (Flowers102: train/val/test; CIFAR, MNIST, STL10:
train/test, val held out of train; Oxford-IIIT Pet: trainval/test). Offline, a set that is not
on disk yet stops the run with one line saying where its files go.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from transferlab.config import DatasetConfig
from transferlab.errors import UserError, did_you_mean


@dataclass(frozen=True)
class SetSpec:
    cls: str  # torchvision.datasets class name
    splits: tuple[str, str | None, str | None]  # how to ask for train, val, test
    split_arg: str  # "train" (a bool) or "split" (a name)
    labels: str  # attribute holding the labels


SETS = {
    "cifar10": SetSpec("CIFAR10", ("train", None, "test"), "train", "targets"),
    "cifar100": SetSpec("CIFAR100", ("train", None, "test"), "train", "targets"),
    "mnist": SetSpec("MNIST", ("train", None, "test"), "train", "targets"),
    "fashion_mnist": SetSpec("FashionMNIST", ("train", None, "test"), "train", "targets"),
    "flowers102": SetSpec("Flowers102", ("train", "val", "test"), "split", "_labels"),
    "oxford_iiit_pet": SetSpec("OxfordIIITPet", ("trainval", None, "test"), "split", "_labels"),
    "stl10": SetSpec("STL10", ("train", None, "test"), "split", "labels"),
}


@dataclass
class TorchvisionSource:
    """The loaded splits of one set (``val`` / ``test`` None where the set has none)."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    label_of: Callable[[Dataset, int], int]

    @property
    def labels(self) -> list[int]:
        return [self.label_of(self.train, i) for i in range(len(self.train))]


def _labels(dataset: Dataset, attr: str) -> list[int]:
    values = getattr(dataset, attr)
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def _classes(dataset: Dataset, n: int) -> list[str]:
    names = getattr(dataset, "classes", None)
    return [str(c) for c in names] if names else [str(i) for i in range(n)]


def load_torchvision_set(cfg: DatasetConfig) -> TorchvisionSource:
    """The train / val / test splits of torchvision set ``cfg.name`` under ``cfg.root``."""
    import torchvision.datasets as tvd

    spec = SETS.get(cfg.name)
    if spec is None:
        raise UserError(f"unknown torchvision dataset {cfg.name!r}{did_you_mean(cfg.name, SETS)}"
                        f"; choose one of {', '.join(SETS)}")
    root = Path(os.path.expanduser(cfg.root or "data")) / cfg.name
    cls = getattr(tvd, spec.cls)

    def load(split: str | None) -> Dataset | None:
        if split is None:
            return None
        arg = {"train": split == "train"} if spec.split_arg == "train" else {"split": split}
        try:
            return cls(str(root), download=cfg.download, **arg)
        except (RuntimeError, OSError) as exc:  # not on disk / no network (URLError...)
            reason = str(getattr(exc, "reason", exc)).splitlines()[0]
            if not cfg.download:
                raise UserError(f"{spec.cls} is not in {root} ({reason}): set "
                                "dataset.download=true, or place its files there") from None
            raise UserError(f"could not download {spec.cls} to {root} ({reason}): run once on "
                            f"a machine with internet and copy {root} here, or point "
                            "dataset.root at a copy") from None

    train, val, test = (load(s) for s in spec.splits)
    label_cache: dict[int, list[int]] = {}

    def label_of(dataset: Dataset, index: int) -> int:
        key = id(dataset)
        if key not in label_cache:
            label_cache[key] = _labels(dataset, spec.labels)
        return label_cache[key][index]

    n = max(_labels(train, spec.labels)) + 1
    return TorchvisionSource(train, val, test, _classes(train, n), label_of)
