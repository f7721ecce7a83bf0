"""``dataset.extra_test={name: folder}``: shifted test sets of a run (evaluated at its end by
:mod:`transferlab.run.extra_test`), each a folder of class folders named as the run's classes."""

from __future__ import annotations

import os
from pathlib import Path

from transferlab.data.image_folder import ImageFileDataset, class_folders, index_folder
from transferlab.errors import UserError, did_you_mean


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
