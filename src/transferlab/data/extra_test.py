"""``dataset.extra_test={name: folder}``: shifted test sets of a run (evaluated at its end by
:mod:`transferlab.run.extra_test`), each a folder of class folders named as the run's classes;
and :func:`named_split`, the split a saved run is evaluated on: ``val``, ``test`` or one of
those sets by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from transferlab.choices import EVAL_SPLITS
from transferlab.data.image_folder import ImageFileDataset, class_folders, index_folder
from transferlab.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from transferlab.backbones.base import InputSpec
    from transferlab.config import RunConfig


def extra_test_set(name: str, folder: str, classes: list[str], transform) -> ImageFileDataset:
    """The images of ``folder``'s class folders, labelled by their index in ``classes``."""
    key = f"dataset.extra_test.{name}"
    root = Path(os.path.expanduser(folder))
    if not root.is_dir():
        raise UserError(f"{key}: {root} does not exist: give a folder of class folders named as "
                        "the run's classes")
    found = class_folders(root)
    unknown = [f for f in found if f not in classes]
    if unknown:
        shown = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
        raise UserError(f"{key}: {root} has class folder {unknown[0]!r}, not a class of the run"
                        f"{did_you_mean(unknown[0], classes)}; its classes are {shown}: rename "
                        "or remove the folder")
    index = index_folder(root, classes=found)  # no class folders: one line from there
    samples = [(path, classes.index(found[label])) for path, label in index.samples]
    return ImageFileDataset(samples, transform)


def named_split(run: RunConfig, spec: InputSpec, image_size: int, split: str,
                classes: list[str], eval_tf: Callable | None = None) -> Dataset:
    """The run's ``split`` with the eval transform (``eval_tf`` replaces it: test-time
    augmentation's views, the corruptions' fixed stages): ``val`` or ``test`` of its dataset,
    or the ``dataset.extra_test`` set of that name, labelled by ``classes`` (the checkpoint's:
    a val or test split's own must match them)."""
    from transferlab.data import build_splits
    from transferlab.data.transforms import eval_transform

    dataset = run.dataset
    if split in EVAL_SPLITS:
        splits = build_splits(dataset, run.augment, spec, image_size, eval_tf)
        found = getattr(splits, split, None)
        if found is None:
            raise UserError(f"dataset {dataset.name} has no {split} split: use split=val")
        if list(splits.classes) != list(classes):
            raise UserError(f"the dataset's classes {splits.classes} differ from the "
                            f"checkpoint's {classes}")
        return found
    if split in dataset.extra_test:
        transform = eval_tf or eval_transform(spec, image_size, dataset.crop_pct)
        return extra_test_set(split, dataset.extra_test[split], classes, transform)
    sets = ", ".join(dataset.extra_test) or "none"
    known = did_you_mean(split, (*EVAL_SPLITS, *dataset.extra_test))
    raise UserError(f"split={split}: the run has no such split{known}: give val, test or one of "
                    f"its dataset.extra_test sets ({sets}), or add one with "
                    f"dataset.extra_test.{split}=<folder of class folders>")
