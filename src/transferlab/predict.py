"""``transferlab-predict``: classify image files with a pretrained backbone or a trained run.

    transferlab-predict backbone=efficientnet_lite0 cat.jpg photos/         # ImageNet top-5
    transferlab-predict backbone=resnet50 top_k=3 cat.jpg                   # a backbone preset
    transferlab-predict backbone=convnext_nano backbone_source=timm cat.jpg
    transferlab-predict run=outputs/runs/2026-11-23/10-00-00_... photos/    # -> RUN/predictions.csv
    transferlab-predict run=RUN checkpoint=last output=preds.csv photos/
    transferlab-predict run=RUN weights=ema photos/                          # the EMA weights
    transferlab-predict backbone=efficientnet_lite0 tta=flip cat.jpg        # test-time augmentation
    transferlab-predict --help                                              # every key

Arguments are ``key=value``, as for ``transferlab-train`` (:mod:`transferlab.cli`); the other
arguments are the image files and folders. Folders are searched recursively. Files that are not
readable images are listed in one warning line and skipped; a missing input path, or no image at
all, is a one-line error (exit code 2).

``tta=flip|five_crop|ten_crop`` averages the softmax probabilities over views of each image
(:mod:`transferlab.tta`); the output says so in a first line ``tta=...: ...``, and the CSV
has a ``tta`` column (``none`` without TTA).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from transferlab.backbones import build_backbone
from transferlab.checkpoint import load_checkpoint
from transferlab.cli import Key, Spec, parse, positive_int, run_main
from transferlab.config import BackboneConfig, compose_config, load_config
from transferlab.data.image_folder import load_rgb
from transferlab.errors import UserError, did_you_mean
from transferlab.registry import BACKBONE_SOURCES
from transferlab.runtime import pick_device
from transferlab.saved_run import (
    CHECKPOINTS,
    WEIGHTS,
    checkpoint_path,
    checkpoint_weights,
    restore_model,
    saved_run_config,
)
from transferlab.tta import HELP as TTA_HELP
from transferlab.tta import TTA_MODES, describe, mean_log_probs, views_transform

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


def skipped_warning(skipped: list[Path]) -> str:
    """One line naming the skipped files (the first few) and their count."""
    names = ", ".join(str(p) for p in skipped[:SHOWN_SKIPPED])
    more = f" ... and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
    return (f"warning: skipped {len(skipped)} file(s) that are not readable images: "
            f"{names}{more}")


# -- models --------------------------------------------------------------------------------------

@dataclass
class Predictor:
    """A classifier in eval mode, its preprocessing (an image to its ``(V, C, H, W)`` views,
    :mod:`transferlab.tta`) and its class names."""

    model: nn.Module
    transform: Callable
    classes: list[str]


def preset_config(name: str) -> BackboneConfig | None:
    """The backbone preset ``conf/backbone/<name>.yaml``, if there is one."""
    preset = resources.files("transferlab.conf") / "backbone" / f"{name}.yaml"
    if not preset.is_file():
        return None
    return load_config(compose_config([f"backbone={name}"])).backbone


def _backbone_of(name: str, source: str) -> BackboneConfig:
    """A pretrained model ``name`` of ``source`` with its schema's defaults."""
    return BACKBONE_SOURCES.schema_of(source)(name=name, source=source)


def backbone_config(name: str, source: str | None) -> BackboneConfig:
    """A pretrained backbone by preset name, or a torchvision / timm model name."""
    if source is not None:
        return _backbone_of(name, source)
    preset = preset_config(name)
    if preset is not None:
        return dataclasses.replace(preset, pretrained=True)
    import timm
    from torchvision import models as tvm

    torchvision_names = tvm.list_models(module=tvm)
    if name in torchvision_names:
        return _backbone_of(name, "torchvision")
    if timm.is_model(name):
        return _backbone_of(name, "timm")
    presets = [p.name[:-5] for p in (resources.files("transferlab.conf") / "backbone").iterdir()
               if p.name.endswith(".yaml")]
    raise UserError(
        f"unknown backbone {name!r}{did_you_mean(name, [*presets, *torchvision_names])}: give a "
        f"preset ({', '.join(sorted(presets))}), a torchvision or a timm model name"
    )


def imagenet_predictor(name: str, source: str | None, tta: str = "none") -> Predictor:
    """A pretrained backbone with its own ImageNet classifier, at its native input size."""
    backbone = build_backbone(backbone_config(name, source))
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
    run = saved_run_config(ckpt.get("config"))
    model, backbone, image_size = restore_model(run, checkpoint_weights(ckpt, weights, path),
                                                len(classes))
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
    return "\n".join([str(path), *lines])


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
    decodable image leaves an earlier ``out`` as it was (and no partial file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with tmp.open("w", newline="") as f:
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

SPEC = Spec(
    prog="transferlab-predict",
    usage="transferlab-predict (backbone=<name> | run=<run dir>) [key=value ...] PATH [PATH ...]",
    summary="Classify image files: the ImageNet top-k of a pretrained backbone (backbone=), or "
            "a CSV of a trained run's predictions (run=). Give exactly one of backbone= and "
            "run=. Folders are searched recursively; files that are not readable images are "
            "skipped with one warning line.",
    keys=(
        Key("backbone", "a backbone preset (conf/backbone), or a torchvision or timm model name",
            metavar="<name>"),
        Key("run", "a run directory written by transferlab-train", Path, metavar="<run dir>"),
        Key("backbone_source", "with backbone=: where the model comes from",
            choices=tuple(BACKBONE_SOURCES.names()), default_text="the preset's, else guessed"),
        Key("top_k", "with backbone=: classes shown per image", positive_int, 5),
        Key("checkpoint", "with run=: which checkpoint of the run", default="best",
            choices=CHECKPOINTS),
        Key("weights", "with run=: the trained weights (raw) or their EMA (ema: runs trained "
            "with trainer.ema.decay)", default="raw", choices=WEIGHTS),
        Key("output", "with run=: the CSV to write", Path, metavar="<file>",
            default_text="<run dir>/predictions.csv"),
        Key("batch_size", "images per batch", positive_int, 32),
        Key("device", "auto, cpu, cuda, cuda:N or mps", default="auto",
            metavar="auto|cpu|cuda|..."),
        Key("tta", TTA_HELP, default="none", choices=TTA_MODES),
    ),
    positionals="PATH",
    positional_help="image files or folders (searched recursively)",
    positionals_required=True,
    notes=("A path whose text before its first '=' looks like a key (cat=1.jpg) is read as "
           "key=value: write it as ./cat=1.jpg.",),
    examples=(
        "transferlab-predict backbone=efficientnet_lite0 top_k=3 cat.jpg photos/",
        "transferlab-predict backbone=convnext_nano backbone_source=timm cat.jpg",
        "transferlab-predict run=outputs/runs/2026-11-23/10-00-00_digits-efficientnet_lite0-"
        "linear_probe photos/",
        "transferlab-predict run=<run dir> checkpoint=last tta=flip output=preds.csv photos/",
    ),
)
IMAGENET_ONLY, RUN_ONLY = ("top_k", "backbone_source"), ("checkpoint", "output", "weights")


@dataclass
class PredictArgs:
    """The parsed command line: ``backbone`` or ``run`` (exactly one is set)."""

    paths: list[str]
    backbone: str | None = None
    run: Path | None = None
    backbone_source: str | None = None
    top_k: int = 5
    checkpoint: str = "best"
    weights: str = "raw"
    output: Path | None = None
    batch_size: int = 32
    device: str = "auto"
    tta: str = "none"


def parse_args(argv: list[str]) -> PredictArgs:
    """``key=value`` arguments and image paths -> :class:`PredictArgs`; mistakes are
    UserErrors."""
    parsed = parse(SPEC, argv)
    given = parsed.given
    if ("backbone" in given) == ("run" in given):
        raise UserError("give exactly one of backbone=<name> (ImageNet top-k of a pretrained "
                        "model) and run=<run dir> (a trained run's predictions)"
                        if not given & {"backbone", "run"} else
                        "backbone= and run= exclude each other: give one of them")
    wrong, mode, other = ((IMAGENET_ONLY, "run", "backbone") if "run" in given
                          else (RUN_ONLY, "backbone", "run"))
    extra = [k for k in wrong if k in given]
    if extra:
        keys = " and ".join(f"{k}=" for k in extra)
        raise UserError(f"{keys} {'go' if len(extra) > 1 else 'goes'} with {other}=, "
                        f"not with {mode}=")
    return PredictArgs(paths=parsed.positionals,
                       **{k: parsed[k] for k in SPEC.key_names})


def imagenet_mode(args: PredictArgs, inputs: Inputs) -> None:
    """Print the top-k ImageNet classes of each image."""
    predictor = imagenet_predictor(args.backbone, args.backbone_source, args.tta)
    if args.tta != "none":
        print(describe(args.tta), flush=True)
    count = 0
    for path, probs in predict(predictor, inputs, args.batch_size, pick_device(args.device)):
        print(format_top_k(path, probs, predictor.classes, args.top_k), flush=True)
        count += 1
    if count == 0:
        raise UserError(f"none of the {len(inputs.images)} image(s) could be decoded")


def run_mode(args: PredictArgs, inputs: Inputs) -> None:
    """Write a trained run's predictions to a CSV and say where it went."""
    predictor = run_predictor(args.run, args.checkpoint, args.weights, args.tta)
    if args.tta != "none":
        print(describe(args.tta), flush=True)
    out = args.output or args.run / "predictions.csv"
    rows = predict(predictor, inputs, args.batch_size, pick_device(args.device))
    count = write_csv(out, rows, predictor.classes, args.tta)
    if count == 0:
        raise UserError(f"none of the {len(inputs.images)} image(s) could be decoded")
    print(f"Predictions for {count} image(s) written to: {out}", flush=True)


def run_cli(argv: list[str]) -> int:
    """Parse, classify, warn about the skipped files."""
    args = parse_args(argv)
    inputs = gather_inputs(args.paths)
    (run_mode if args.run is not None else imagenet_mode)(args, inputs)
    if inputs.skipped:
        print(skipped_warning(inputs.skipped), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-predict`` entry point; the exit code: 0, 2 after one
    ``error: <message>`` line for a user error, 130 when interrupted."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
