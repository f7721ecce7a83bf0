"""Folders of class folders: ``root/{train,val}/<class>/*.jpg`` or one ``root/<class>/`` split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from transferlab.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderIndex:
    classes: list[str]
    samples: list[tuple[Path, int]]
    skipped: list[Path] = field(default_factory=list)


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_folder(root: Path, classes: list[str] | None = None) -> FolderIndex:
    """Index ``root/<class>/<image>``; files that are not images are skipped and listed."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist: check dataset.root")
    found = class_folders(root)
    if not found:
        raise UserError(f"{root} has no class folders: expected {root}/<class name>/<images>")
    classes = classes if classes is not None else found
    if found != classes:
        raise UserError(f"{root} has class folders {found}, expected {classes} (as in train/)")
    samples, skipped = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise UserError(f"class folder {root / name} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(p, label) for p in images]
    return FolderIndex(classes, samples, skipped)


class ImageFileDataset(Dataset):
    """Images read from disk with PIL (converted to RGB), passed through ``transform``."""

    def __init__(self, samples: list[tuple[Path, int]], transform=None):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return (self.transform(image) if self.transform else image), label
