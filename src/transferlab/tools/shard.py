"""``transferlab-shard``'s library half: an image folder written as WebDataset tar shards.

Each split folder (``train/``, ``val/``, ``test/`` of class folders; or the class folders
themselves: one ``train`` split) becomes ``<split>-000000.tar``, ``<split>-000001.tar``, ...
of at most ``maxcount`` samples: ``<key>.<image extension>`` (the file's bytes, unchanged)
and ``<key>.cls`` (the class index). ``index.json`` beside them gives the class names and,
per shard, its size, sample count and each sample's (key, label, image offset, image size),
so that runs and progress bars know the length and a run reads an image without scanning.
The tar headers carry no time or owner: the same folder gives the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from transferlab.data.image_folder import class_folders, index_folder
from transferlab.data.shards import INDEX_FILE, scan_shard
from transferlab.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class ShardReport:
    """What was written: per split, its shard files and sample count."""

    classes: list[str]
    splits: dict[str, dict]
    skipped: list[str]


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    return info, io.BytesIO(data)


def write_split(samples: list[tuple[Path, int]], out: Path, split: str,
                maxcount: int) -> list[Path]:
    """``samples`` (image file, label) as ``out/<split>-NNNNNN.tar`` shards, in order."""
    paths = []
    for number, first in enumerate(range(0, len(samples), maxcount)):
        path = out / f"{split}-{number:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (file, label) in enumerate(samples[first:first + maxcount], start=first):
                key, ext = f"{split}_{i:06d}", file.suffix.lower().lstrip(".")
                tar.addfile(*_member(f"{key}.{ext}", file.read_bytes()))
                tar.addfile(*_member(f"{key}.cls", str(label).encode()))
        paths.append(path)
    return paths


def write_shards(root: Path, out: Path, maxcount: int = 1000) -> ShardReport:
    """Write the image folder ``root`` as shards into ``out`` (created), with ``index.json``."""
    if not root.is_dir():
        raise UserError(f"root={root} is not a folder: give a folder of class folders, or of "
                        "train/ val/ [test/] class folders")
    present = [s for s in SPLITS if s in class_folders(root)]
    if present and "train" not in present:
        raise UserError(f"{root} has {'/, '.join(present)}/ but no train/: add train/<class>/ "
                        "folders")
    folders = {s: root / s for s in present} or {"train": root}
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("*.tar"))
    if stale:
        raise UserError(f"output={out} already holds {len(stale)} .tar file(s) "
                        f"({stale[0].name}, ...): write into an empty folder")
    classes, index, skipped, report = None, {}, [], {}
    for split, folder in folders.items():
        found = index_folder(folder, classes=classes)
        classes, skipped = found.classes, skipped + [str(p) for p in found.skipped]
        shards = write_split(found.samples, out, split, maxcount)
        for shard in shards:
            samples = scan_shard(str(shard), _exts(found.samples), "cls")
            index[shard.name] = {"size": shard.stat().st_size, "count": len(samples),
                                 "image_keys": _exts(found.samples), "label_key": "cls",
                                 "samples": [[s.key, s.label, s.offset, s.size]
                                             for s in samples]}
        report[split] = {"shards": [s.name for s in shards], "count": len(found.samples),
                         "urls": _pattern(out, split, len(shards))}
    (out / INDEX_FILE).write_text(json.dumps({"classes": classes, "splits": report,
                                              "shards": index}))
    return ShardReport(classes, report, skipped)


def _exts(samples: list[tuple[Path, int]]) -> list[str]:
    """The image extensions of a split's files (each sample has one)."""
    return sorted({file.suffix.lower().lstrip(".") for file, _ in samples})


def _pattern(out: Path, split: str, count: int) -> str:
    """The brace pattern of a split's shards (what ``dataset.urls`` takes)."""
    last = f"{count - 1:06d}"
    return str(out / (f"{split}-{{000000..{last}}}.tar" if count > 1 else f"{split}-000000.tar"))
