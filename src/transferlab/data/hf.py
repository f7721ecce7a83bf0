"""``dataset=hf``: a Hugging Face dataset, from the Hub (``dataset.path=beans``) or a folder
written by ``save_to_disk`` (``dataset.path=/data/beans``). Needs the ``datasets`` package (the
``[hf]`` extra), imported only when such a dataset is built.

Class names come from the label column's ``ClassLabel`` feature (else the sorted distinct
labels). The feature cache knows a split by the dataset's fingerprint (which ``datasets``
changes with every change of the data), the split, the columns and the rows used.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from transferlab.config.schema import HfDatasetConfig
from transferlab.data import DataSplits, assemble, holdout
from transferlab.data.image_folder import to_rgb
from transferlab.errors import UserError, did_you_mean

INSTALL_HINT = "pip install 'transferlab[hf]'"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(f"dataset=hf needs the datasets package: {INSTALL_HINT}") from None
    return datasets


def load_splits(path: str, names: list[str]) -> dict:
    """The named splits of the dataset at ``path`` (a ``save_to_disk`` folder, else a Hub
    name); a folder holding one split (a saved ``Dataset``) is the ``train`` split."""
    datasets = _datasets()
    folder = Path(path).expanduser()
    if folder.is_dir():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
    else:
        loaded = datasets.load_dataset(path)
    missing = [n for n in names if n not in loaded]
    if missing:
        raise UserError(f"dataset.path={path} has no split {missing[0]!r}"
                        f"{did_you_mean(missing[0], list(loaded))}; its splits: "
                        f"{', '.join(loaded)} (dataset.train_split / val_split / test_split)")
    return {n: loaded[n] for n in names}


def _check_columns(split, name: str, cfg: HfDatasetConfig) -> None:
    for key, column in (("image_key", cfg.image_key), ("label_key", cfg.label_key)):
        if column not in split.column_names:
            raise UserError(f"split {name!r} of dataset.path={cfg.path} has no column "
                            f"{column!r} (dataset.{key}){did_you_mean(column, split.column_names)}"
                            f"; its columns: {', '.join(split.column_names)}")


def class_names(split, label_key: str) -> list[str] | None:
    """The ``ClassLabel`` names of the label column, or None where it has none."""
    names = getattr(split.features[label_key], "names", None)
    return list(names) if names else None


class HfImages(Dataset):
    """Rows of Hugging Face dataset splits: ``items`` are (split name, row, label); the images
    (PIL, or encoded bytes) turned into RGB and passed through ``transform``."""

    def __init__(self, sources: dict, items: list[tuple[str, int, int]], image_key: str,
                 transform=None):
        self.sources = {n: s.select_columns([image_key]) for n, s in sources.items()}
        self.items, self.image_key, self.transform = items, image_key, transform

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [label for _, _, label in self.items]

    def __getitem__(self, i: int):
        split, row, label = self.items[i]
        image = self.sources[split][row][self.image_key]
        if isinstance(image, dict):  # an Image feature read undecoded: {"bytes", "path"}
            image = Image.open(io.BytesIO(image["bytes"]))
        image = to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(image))
        return (self.transform(image) if self.transform else image), label

    def cache_identity(self, content: bool) -> str:
        """Each source split's fingerprint, the image column and the rows (and labels) used;
        ``content`` plays no part: the fingerprint already follows the data."""
        h = hashlib.sha256(f"hf {self.image_key}\n".encode())
        for name in sorted({split for split, _, _ in self.items}):
            h.update(f"{name} {self.sources[name]._fingerprint}\n".encode())
        h.update(repr(self.items).encode())
        return h.hexdigest()


def build_hf(cfg: HfDatasetConfig, train_tf, eval_tf) -> DataSplits:
    """``dataset=hf``: train from ``train_split``; val from ``val_split`` or held out of train
    by ``val_fraction``; test from ``test_split`` or ``test_fraction`` of train."""
    named = [n for n in (cfg.train_split, cfg.val_split, cfg.test_split) if n]
    sources = load_splits(cfg.path, list(dict.fromkeys(named)))
    for name, split in sources.items():
        _check_columns(split, name, cfg)
    train = sources[cfg.train_split]
    classes = class_names(train, cfg.label_key)
    if classes is None:
        values = {str(v) for s in sources.values() for v in s[cfg.label_key]}
        classes = sorted(values)
    index = {name: i for i, name in enumerate(classes)}

    def items(name: str) -> list[tuple[str, int, int]]:
        labels = sources[name][cfg.label_key]
        if class_names(sources[name], cfg.label_key) is None:
            labels = [index[str(v)] for v in labels]
        return [(name, row, int(y)) for row, y in enumerate(labels)]

    train_items = items(cfg.train_split)
    labels = [y for _, _, y in train_items]
    keep, held, out = holdout(labels, cfg, val=cfg.val_split is None,
                              test=cfg.test_split is None, names=classes)
    val_items = items(cfg.val_split) if cfg.val_split else [train_items[i] for i in held]
    test_items = items(cfg.test_split) if cfg.test_split else [train_items[i] for i in out]
    make = lambda rows, tf: HfImages(sources, rows, cfg.image_key, tf)  # noqa: E731
    return assemble(cfg, classes, make, [train_items[i] for i in keep], val_items,
                    test_items or None, lambda item: item[2], train_tf, eval_tf)
