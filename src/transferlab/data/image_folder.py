"""Folders of class folders: ``root/{train,val}/<class>/*.jpg`` or one ``root/<class>/`` split."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from transferlab.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image. 16-bit and 32-bit integer images (PNG mode ``I;16``,
    ``I``) are scaled to 8 bits first: PIL's own conversion clips them, which turns a 16-bit
    photo almost white. 32-bit float images (TIFF mode ``F``) in [0, 1] are scaled by 255 (PIL
    would truncate them to 0 and 1: all black); floats beyond 1 are taken as 0..255 values."""
    if image.mode == "F":
        import numpy as np

        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        eight = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        eight = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """The image file at ``path`` decoded, as 8-bit RGB (:func:`to_rgb`)."""
    with Image.open(path) as im:
        return to_rgb(im)


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
        files = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if is_image(p)]
        skipped += [p for p in files if p not in set(images)]
        if not images:
            raise UserError(f"class folder {root / name} holds no readable images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(p, label) for p in images]
    return FolderIndex(classes, samples, skipped)


def is_image(path: Path) -> bool:
    """An image file PIL can read: known extension, valid header and structure.

    Checked once while indexing, so that a corrupt or truncated file is skipped and reported
    instead of failing an epoch half-way through.
    """
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() misses truncated data: decode a thumbnail
            im.draft("RGB", (32, 32))
            im.load()
    except Exception:  # PIL raises many types for broken files
        return False
    return True


def normalise_label(text: str | None) -> str:
    """A CSV label as a class name: stripped, and a number with an integral value written as
    that integer (``1``, ``1.0`` and `` 1 `` are one class)."""
    label = (text or "").strip()
    try:
        number = Decimal(label)  # exact: 12345678901234567890 and ...891 stay two classes
    except InvalidOperation:
        return label
    if not number.is_finite() or number != number.to_integral_value():
        return label
    return str(int(number))


def read_csv_index(root: Path, csv_file: str | None, x_col: str, y_col: str,
                   allow_outside_root: bool = False) -> FolderIndex:
    """A CSV of image file names (``x_col``, relative to ``root``) and labels (``y_col``), the
    Kaggle layout (e.g. ``id,has_cactus``). Classes are the sorted distinct labels; rows whose
    file is missing or unreadable are skipped and listed. A file outside ``root`` (an absolute
    path, ``../``) is refused unless ``allow_outside_root``; a file listed twice with two
    labels is refused."""
    import csv

    if not csv_file:
        raise UserError("dataset kind csv needs dataset.csv_file=/path/to/labels.csv")
    path = Path(csv_file).expanduser()
    if not path.is_file():
        raise UserError(f"dataset.csv_file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for col, key in ((x_col, "x_col"), (y_col, "y_col")):
            if col not in columns:
                raise UserError(f"{path} has no column {col!r} (dataset.{key}); its columns: "
                                f"{', '.join(columns)}")
        rows = []
        for number, row in enumerate(reader, start=2):  # row 1: the header
            label = normalise_label(row[y_col])
            if label == "":
                raise UserError(f"{path.name} row {number}: empty label in column {y_col!r}: "
                                "give every row a label, or remove the row")
            rows.append((row[x_col], label))
    if not rows:
        raise UserError(f"{path} has no rows")
    _check_rows(rows, root, path, allow_outside_root)
    classes = sorted({y for _, y in rows})
    label = {name: i for i, name in enumerate(classes)}
    samples, skipped = [], []
    for name, y in rows:
        file = root / name
        if file.is_file() and is_image(file):
            samples.append((file, label[y]))
        else:
            skipped.append(file)
    if not samples:
        raise UserError(f"none of the {len(rows)} files named in {path} is a readable image "
                        f"under {root}: check dataset.root and dataset.x_col")
    return FolderIndex(classes, samples, skipped)


def _check_rows(rows: list[tuple[str, str]], root: Path, path: Path, outside: bool) -> None:
    """Every file under ``root`` (unless ``outside``), and one label per file."""
    inside, seen = os.path.normpath(os.path.abspath(root)), {}
    for number, (name, label) in enumerate(rows, start=2):
        file = os.path.normpath(os.path.join(inside, name))  # by the text: symlinks may point out
        if not outside and os.path.commonpath([inside, file]) != inside:
            raise UserError(f"{path.name} row {number}: {name!r} is outside dataset.root={root}: "
                            "list files under the root, or set dataset.allow_outside_root=true")
        if seen.setdefault(file, (label, number))[0] != label:
            first_label, first_row = seen[file]
            raise UserError(f"{path.name} rows {first_row} and {number} give {name!r} two labels "
                            f"({first_label!r}, {label!r}): keep one row per file")


class ImageFileDataset(Dataset):
    """Images read from disk with PIL (converted to RGB), passed through ``transform``."""

    def __init__(self, samples: list[tuple[Path, int]], transform=None):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), label


class IndexedImages(Dataset):
    """Items ``(source dataset, index)`` of datasets yielding (PIL image, label): images turned
    into RGB (grayscale sets too), labels from ``label_of(source, index)``."""

    def __init__(self, items: list[tuple], label_of, transform=None):
        self.items, self.label_of, self.transform = items, label_of, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        source, index = self.items[i]
        image = source[index][0]
        if isinstance(image, Image.Image):
            image = to_rgb(image)
        return (self.transform(image) if self.transform else image), self.label_of(source, index)
