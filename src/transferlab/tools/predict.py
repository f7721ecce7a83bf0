"""``transferlab-predict``: classify image files with a pretrained backbone or a trained run.

    transferlab-predict backbone=efficientnet_lite0 cat.jpg photos/         # ImageNet top-5
    transferlab-predict backbone=resnet50 top_k=3 cat.jpg                   # a backbone preset
    transferlab-predict backbone=convnext_nano backbone_source=timm cat.jpg
    transferlab-predict run=outputs/runs/2026-11-23/10-00-00_... photos/    # -> RUN/predictions.csv
    transferlab-predict run=RUN checkpoint=last output=preds.csv photos/
    transferlab-predict run=RUN weights=ema photos/                          # the EMA weights
    transferlab-predict backbone=efficientnet_lite0 tta=flip cat.jpg        # test-time augmentation
    transferlab-predict --help                                              # every key

Arguments are ``key=value``, as for ``transferlab-train`` (:mod:`transferlab.cli.args`); the other
arguments are the image files and folders. Folders are searched recursively. Files that are not
readable images are listed in one warning line and skipped; a missing input path, or no image at
all, is a one-line error (exit code 2).

``tta=flip|five_crop|ten_crop`` averages the softmax probabilities over views of each image
(:mod:`transferlab.tools.tta`); the output says so in a first line ``tta=...: ...``, and the CSV
has a ``tta`` column (``none`` without TTA).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from transferlab.backbones import build_backbone
from transferlab.data.image_folder import load_rgb
from transferlab.errors import UserError
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.run.saved import (
    checkpoint_config,
    checkpoint_path,
    restore_saved,
)
from transferlab.tools.backbone_lookup import backbone_config
from transferlab.tools.tta import mean_log_probs, views_transform

SHOWN_SKIPPED = 10  # file names listed in the warning line (then "... and N more")


# -- inputs --------------------------------------------------------------------------------------

def collect_files(paths: list[str]) -> list[Path]:
    """The files named by ``paths`` (folders searched recursively), in order, without repeats.

    A path that does not exist is a :class:`UserError`.
    """
    seen: dict[Path, Path] = {}
    for text in paths:
        path = Path(text).expanduser()
        if not path.exists():
            raise UserError(f"input path {path} does not exist")
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in found:
            seen.setdefault(file.resolve(), file)
    return list(seen.values())


def looks_like_image(path: Path) -> bool:
    """Whether PIL recognises the file as an image (reads its header only)."""
    try:
        with Image.open(path):
            return True
    except Exception:  # not an image, unreadable, a decompression bomb, ...
        return False


def read_rgb(path: Path) -> Image.Image | None:
    """The decoded image in RGB, or None when it cannot be decoded."""
    try:
        return load_rgb(path)
    except Exception:  # truncated or corrupt data
        return None


@dataclass
class Inputs:
    """The image files to classify and the files skipped so far (not readable images)."""

    images: list[Path]
    skipped: list[Path] = field(default_factory=list)


def gather_inputs(paths: list[str]) -> Inputs:
    """Every readable image under ``paths``; no image at all is a :class:`UserError`."""
    files = collect_files(paths)
    readable = {f: looks_like_image(f) for f in files}
    inputs = Inputs(images=[f for f, ok in readable.items() if ok],
                    skipped=[f for f, ok in readable.items() if not ok])
    if not inputs.images:
        where = ", ".join(paths)
        what = f"none of its {len(files)} file(s) is a readable image" if files else "no files"
        raise UserError(f"no image to classify in {where}: {what}")
    return inputs


def shown(path: Path) -> str:
    """``path`` as text any console takes: a name's bytes that are not UTF-8 as ``\\udcXX``."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def skipped_warning(skipped: list[Path]) -> str:
    """One line naming the skipped files (the first few) and their count."""
    names = ", ".join(shown(p) for p in skipped[:SHOWN_SKIPPED])
    more = f" ... and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
    return (f"warning: skipped {len(skipped)} file(s) that are not readable images: "
            f"{names}{more}")


# -- models --------------------------------------------------------------------------------------

@dataclass
class Predictor:
    """A classifier in eval mode, its preprocessing (an image to its ``(V, C, H, W)`` views,
    :mod:`transferlab.tools.tta`) and its class names."""

    model: nn.Module
    transform: Callable
    classes: list[str]


def imagenet_predictor(name: str, source: str | None, tta: str = "none",
                       fields: dict | None = None) -> Predictor:
    """A pretrained backbone with its own ImageNet classifier, at its native input size;
    ``fields`` change its config (``weights_path``: its weights from a file)."""
    backbone = build_backbone(backbone_config(name, source, fields))
    if backbone.imagenet_head is None or not backbone.categories:
        raise UserError(f"backbone {backbone.name} has no ImageNet-1k classifier to predict "
                        "with: choose a model pretrained on ImageNet-1k")
    model = nn.Sequential(backbone.module, backbone.imagenet_head).eval()
    spec = backbone.input
    return Predictor(model, views_transform(tta, spec, spec.size), list(backbone.categories))


def run_predictor(run_dir: Path, which: str, weights: str = "raw",
                  tta: str = "none") -> Predictor:
    """The trained model of a run, rebuilt from its saved config, with its eval preprocessing;
    ``weights``: the trained ones (raw) or their EMA (ema)."""
    path = checkpoint_path(run_dir, which)
    ckpt = load_checkpoint(path)
    if "classes" not in ckpt or "model" not in ckpt:
        raise UserError(f"{run_dir} holds no transferlab checkpoint {which}.pt (no model or "
                        "classes in it)")
    classes = [str(c) for c in ckpt["classes"]]
    run = checkpoint_config(ckpt)
    model, backbone, image_size = restore_saved(run, ckpt, path, weights, len(classes))
    transform = views_transform(tta, backbone.input, image_size, run.dataset.crop_pct)
    return Predictor(model, transform, classes)


# -- inference -----------------------------------------------------------------------------------

def predict(predictor: Predictor, inputs: Inputs, batch_size: int,
            device: torch.device) -> Iterator[tuple[Path, torch.Tensor]]:
    """(path, class probabilities) for each image, in batches; undecodable files are added to
    ``inputs.skipped``."""
    model = predictor.model.to(device).eval()
    for start in range(0, len(inputs.images), batch_size):
        paths, tensors = [], []
        for path in inputs.images[start:start + batch_size]:
            image = read_rgb(path)
            if image is None:
                inputs.skipped.append(path)
                continue
            paths.append(path)
            tensors.append(predictor.transform(image))
        if not paths:
            continue
        with torch.inference_mode():  # the mean of the views' probabilities
            probs = mean_log_probs(model, torch.stack(tensors).to(device)).exp().cpu()
        yield from zip(paths, probs, strict=True)


def format_top_k(path: Path, probs: torch.Tensor, classes: list[str], k: int) -> str:
    """The path, then one ``probability  class`` line for each of the k likeliest classes."""
    top = probs.topk(min(k, len(classes)))
    lines = [f"  {p:.4f}  {classes[i]}" for p, i in zip(top.values.tolist(),
                                                         top.indices.tolist(), strict=True)]
    return "\n".join([shown(path), *lines])


CSV_FIXED = ["path", "label", "probability", "tta"]


def csv_header(classes: list[str]) -> list[str]:
    """``path,label,probability,tta`` and one probability column per class (renamed on a
    clash)."""
    fixed = CSV_FIXED
    return fixed + [f"p_{c}" if c in fixed else c for c in classes]


def write_csv(out: Path, rows: Iterator[tuple[Path, torch.Tensor]], classes: list[str],
              tta: str = "none") -> int:
    """Write one row per image; returns how many were written. The rows go to a temporary
    file renamed over ``out`` once every image is done: a failure, an interrupt or no
    decodable image leaves an earlier ``out`` as it was (and no partial file). The file is
    UTF-8; a file name that is not keeps its own bytes (``surrogateescape``): the path column
    names the very file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(csv_header(classes))
            for path, probs in rows:
                best = int(probs.argmax())
                writer.writerow([str(path), classes[best], f"{float(probs[best]):.6f}", tta,
                                 *(f"{p:.6f}" for p in probs.tolist())])
                count += 1
        if count:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


# -- command line --------------------------------------------------------------------------------

