"""``transferlab-export``: a trained run's model as ONNX and TorchScript files, with the
preprocessing they expect, to deploy without transferlab.

    transferlab-export run=outputs/runs/2026-11-23/10-00-00_...      # -> RUN/export/
    transferlab-export run=<run dir> checkpoint=last format=onnx output=deploy/
    transferlab-export checkpoint=<run dir>/checkpoints/best.pt      # a checkpoint file alone
    transferlab-export run=<run dir> images=photos/ samples=all      # verify on these photos
    transferlab-export --help                                          # every key

Writes into ``output`` (default ``<run dir>/export/``):

* ``model.onnx``: input ``image`` (batch, 3, H, W) float32, output ``logits`` (batch, classes);
  the batch axis is dynamic. Exported with PyTorch's TorchScript-based ONNX exporter
  (``dynamo=False``: fast, no extra packages, it writes the opset asked for); where that
  exporter fails or is gone, with the ``torch.export``-based one (needs ``onnxscript``).
* ``model.ts``: the same model as TorchScript, made by ``torch.jit.trace``. Tracing, not
  scripting: it works for every backbone the runs use (torchvision, timm, the efficientnet_lite0
  package), while many of their modules are not scriptable; the networks have no
  input-dependent control flow, and the verification below runs the traced file at two batch
  sizes. Load it with ``torch.jit.load`` (PyTorch only, no transferlab).
* ``preprocessing.json``: what to do to an image before either model (RGB, resize the short
  side, centre crop, scale to [0, 1], normalise, NCHW float32), the class names in output
  order, the backbone, the run, and the verification's result.

A ``freeze=lora`` run's adapters are merged into the weights first (:func:`transferlab.lora.
merge_adapters`): the files hold the plain architecture, no peft modules. Verification then also
compares the merged model with the adapter model.

Verification (``verify=true``, the default) runs the files just written, ONNX with
onnxruntime and TorchScript with ``torch.jit.load``, on real images (the run's val split
through its eval transform, or the photos in ``images=``), first one image alone and then the
rest as a batch, and compares their class probabilities with the PyTorch model's. Above
``tolerance`` (default 1e-4) the command ends with one line ``error: ...`` and exit code 1; the
files stay for inspection. Mistakes (no such run, a task=logreg or autoencoder run) are one
line and exit code 2 (:mod:`transferlab.cli.args`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.choices import DEFAULT_OPSET, EXPORT_INSTALL
from transferlab.config import RunConfig
from transferlab.errors import UserError
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.run.saved import (
    checkpoint_config,
    restore_saved,
)
from transferlab.run.wise import interpolate, load_start

log = logging.getLogger("transferlab")
ONNX_FILE, TORCHSCRIPT_FILE, PREPROCESSING_FILE = "model.onnx", "model.ts", "preprocessing.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
FORMAT_TAG = "transferlab-export/1"


# -- command line -------------------------------------------------------------------------------


@dataclass
class ExportArgs:
    """The parsed command line: the checkpoint file, where to write, what to check."""

    checkpoint: Path
    output: Path
    run: Path | None = None  # the run directory, when known
    format: str = "both"
    opset: int = DEFAULT_OPSET
    verify: bool = True
    images: Path | None = None
    samples: int | None = 32  # None: every image
    tolerance: float = 1e-4
    weights: str = "raw"  # raw | ema
    wise: float | None = None  # WiSE-FT: the weights this far from the start (run.wise)

    @property
    def formats(self) -> tuple[str, ...]:
        return ("onnx", "torchscript") if self.format == "both" else (self.format,)




# -- the saved model ------------------------------------------------------------------------------
@dataclass
class SavedModel:
    """A run's classifier rebuilt from a checkpoint, on the CPU in eval mode, float32."""

    model: nn.Module
    run: RunConfig
    backbone: Any  # transferlab.backbones.Backbone
    image_size: int
    classes: list[str]
    checkpoint: Path
    epoch: int | None
    weights: str = "raw"
    wise: dict[str, Any] | None = None  # WiSE-FT: alpha and the start weights' file
    adapters: dict[str, Any] | None = None  # freeze=lora: the adapters merged into ``model``
    adapted: nn.Module | None = None  # ... and the model with them, to check the merge against


def load_saved_model(path: Path, weights: str = "raw", wise: float | None = None,
                     run_dir: Path | None = None) -> SavedModel:
    """The classifier of the checkpoint at ``path``; a run with no network to export is a
    one-line :class:`UserError`. ``wise``: its weights interpolated with those the run
    started fine-tuning from (``run_dir``'s ``wise_start.pt``), ``wise`` being the
    final weights' share (:func:`transferlab.run.wise.interpolate`)."""
    ckpt = load_checkpoint(path)
    run = checkpoint_config(ckpt)  # an autoencoder run is refused here
    classes = [str(c) for c in ckpt.get("classes") or []]
    if "model" not in ckpt or not classes:
        raise UserError(f"{path} holds no model weights or class names (not a checkpoint "
                        "written by transferlab-train?)")
    model, backbone, image_size = restore_saved(run, ckpt, path, weights, len(classes))
    model = model.float().cpu().eval()
    mixed = None
    if wise is not None:
        start, mixed = load_start(run_dir, ckpt.get("config"), len(classes))
        model.load_state_dict(interpolate(start.float().state_dict(), model.state_dict(), wise))
        mixed["alpha"] = wise
    adapters = adapted = None
    if model.adapters is not None:  # freeze=lora: export the plain layers with merged weights
        from transferlab.lora import merge_adapters

        adapters = model.adapters.record()
        adapted = copy.deepcopy(model)
        adapters["merged"] = merge_adapters(model)
    return SavedModel(model, run, backbone, image_size, classes, path, ckpt.get("epoch"), weights,
                      mixed, adapters, adapted)


def eval_steps(saved: SavedModel) -> dict[str, Any]:
    """Resize, crop and normalisation of the run's eval transform
    (:func:`transferlab.data.transforms.eval_transform`), read off the transform itself."""
    from torchvision.transforms import v2 as T

    from transferlab.data.transforms import eval_transform

    transform = eval_transform(saved.backbone.input, saved.image_size, saved.run.dataset.crop_pct)
    steps = {type(t): t for t in transform.transforms}
    resize, crop, normalize = steps[T.Resize], steps[T.CenterCrop], steps[T.Normalize]
    (short,) = resize.size
    return {"resize_size": short, "crop_size": list(crop.size),
            "interpolation": resize.interpolation.value, "antialias": bool(resize.antialias),
            "mean": [float(m) for m in normalize.mean], "std": [float(s) for s in normalize.std]}


def preprocessing(saved: SavedModel, args: ExportArgs) -> dict[str, Any]:
    """Everything a deployment needs besides the model file: the input, the steps that make it
    from an image file, the output and its class names, and where the model came from."""
    size, eval_ = saved.image_size, eval_steps(saved)
    resize, interpolation = eval_["resize_size"], eval_["interpolation"]
    config = args.run / ".hydra" / "config.yaml" if args.run is not None else None
    return {
        "format": FORMAT_TAG,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "color": "RGB",
                  "shape": ["batch", 3, size, size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(saved.classes)],
                   "meaning": "logits: softmax over the last axis gives class probabilities"},
        "image_size": size,
        **eval_,
        "scale": 1 / 255,
        "steps": [
            "decode the image as 8-bit RGB",
            f"resize ({interpolation}, antialiased) so that the shorter side is {resize} px and "
            f"the longer side floor({resize} * longer / shorter) px; PIL's Image.resize "
            "matches torchvision's within one level of 255",
            f"crop the centre {size}x{size} px: left = round((width - {size}) / 2), "
            f"top = round((height - {size}) / 2)",
            "divide by 255 to float32 in [0, 1]",
            "subtract mean and divide by std, per channel (R, G, B)",
            f"lay out as channels first: (batch, 3, {size}, {size})",
        ],
        "classes": saved.classes,
        "backbone": {"name": saved.run.backbone.name, "source": saved.run.backbone.source},
        "head": saved.run.head.name,
        "lora": saved.adapters,
        "run": {"name": saved.run.name,
                "dir": str(args.run) if args.run is not None else None,
                "config_path": str(config) if config is not None and config.is_file() else None,
                "checkpoint": str(saved.checkpoint), "epoch": saved.epoch,
                "weights": saved.weights, "wise": saved.wise},
    }


# -- the exporters ------------------------------------------------------------------------------
def example_input(image_size: int) -> torch.Tensor:
    """A batch of two blank images (two, so no exporter takes the batch size for a constant)."""
    return torch.zeros(2, 3, image_size, image_size)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without PyTorch's deprecation notices about its own exporters (not about the model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def _no_native_stdout() -> Iterator[None]:
    """Without what native code writes to file descriptor 1: the TorchScript-based ONNX
    exporter prints its whole graph there (100 kB for a ViT) when it fails, which it does for
    some models before the other exporter succeeds."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def require(module: str, what: str):
    """Import ``module`` or fail in one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {module} package: {EXPORT_INSTALL}") from None


def _onnx_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    """PyTorch's TorchScript-based exporter (``dynamo=False``): deprecated, but fast, offline,
    needs no onnxscript and writes the opset asked for."""
    with _no_native_stdout():
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _onnx_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    """The ``torch.export``-based exporter (needs onnxscript): opset 18 or later (its
    conversion down to older opsets fails noisily), one file (weights inside)."""
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], opset_version=max(opset, 18),
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                      verbose=False)


ONNX_EXPORTERS = {"torchscript": _onnx_torchscript, "dynamo": _onnx_dynamo}  # tried in order


def export_onnx(model: nn.Module, path: Path, image_size: int, opset: int) -> dict[str, Any]:
    """Write ``model`` as ONNX with a dynamic batch axis, with the first exporter of
    :data:`ONNX_EXPORTERS` that succeeds; what was written (exporter, opset) and tried."""
    onnx = require("onnx", "format=onnx")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    failed: list[str] = []
    try:
        for exporter, write in ONNX_EXPORTERS.items():
            try:
                with _quiet(), torch.no_grad():
                    write(model, example_input(image_size), tmp, opset)
                break
            except Exception as exc:  # noqa: BLE001 - the next exporter may work
                failed.append(f"{exporter} exporter: {_first_line(exc)}")
        else:
            raise UserError(f"the model could not be exported to ONNX ({'; '.join(failed)}); "
                            "format=torchscript may still work")
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    opsets = {o.domain: o.version for o in proto.opset_import}
    return {"file": path.name, "exporter": exporter, "opset": opsets.get("", opset),
            "dynamic_axes": {INPUT_NAME: [0], OUTPUT_NAME: [0]}, "failed": failed}


def export_torchscript(model: nn.Module, path: Path, image_size: int) -> dict[str, Any]:
    """Write ``model`` traced to TorchScript."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _quiet(), torch.no_grad():
            try:
                traced = torch.jit.trace(model, example_input(image_size))
            except Exception as exc:  # noqa: BLE001 - a module tracing cannot follow
                raise UserError(f"the model could not be traced to TorchScript "
                                f"({_first_line(exc)}); format=onnx may still work") from None
            torch.jit.save(traced, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "method": "torch.jit.trace"}


# -- verification ------------------------------------------------------------------------------
def spread(count: int, samples: int | None) -> list[int]:
    """``samples`` indices spread evenly over ``range(count)`` (every class of a sorted
    split), or all of them."""
    if samples is None or samples >= count:
        return list(range(count))
    return sorted({int(i * count / samples) for i in range(samples)})


def val_images(saved: SavedModel, samples: int | None) -> tuple[torch.Tensor, str]:
    """Images of the run's val split through its eval transform, and their description."""
    from transferlab.tools.evaluate import eval_dataset

    try:
        dataset = eval_dataset(saved.run, saved.backbone, saved.image_size, "val", saved.classes)
    except UserError as exc:
        raise UserError(f"{exc} (verification reads the run's val split: give "
                        "images=<folder> or verify=false)") from None
    picked = spread(len(dataset), samples)
    if not picked:
        raise UserError("the run's val split is empty: give images=<folder> or verify=false")
    return (torch.stack([dataset[i][0] for i in picked]),
            f"{len(picked)} {saved.run.dataset.name} val images")


def folder_images(saved: SavedModel, folder: Path, samples: int | None) -> tuple[torch.Tensor,
                                                                                  str]:
    """The images under ``folder`` through the run's eval transform, and their description."""
    from transferlab.data.transforms import eval_transform
    from transferlab.tools.predict import gather_inputs, read_rgb

    if not folder.is_dir():
        raise UserError(f"images={folder} is not a folder")
    files = gather_inputs([str(folder)]).images
    transform = eval_transform(saved.backbone.input, saved.image_size, saved.run.dataset.crop_pct)
    decoded = [image for image in (read_rgb(files[i]) for i in spread(len(files), samples))
               if image is not None]
    if not decoded:
        raise UserError(f"no image under {folder} could be decoded")
    return torch.stack([transform(image) for image in decoded]), f"{len(decoded)} images " \
                                                                  f"from {folder}"


def batches(images: torch.Tensor, size: int = 16) -> list[torch.Tensor]:
    """One image alone, then the rest in batches: both batch sizes of the dynamic axis."""
    rest = images[1:]
    return [images[:1], *(rest[i:i + size] for i in range(0, len(rest), size))]


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    """The logits onnxruntime computes with the ONNX file."""
    ort = require("onnxruntime", "verifying model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: b.numpy()})[0])
                      for b in batches(images)])


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    """The logits the TorchScript file computes, loaded as a deployment would load it."""
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return torch.cat([module(b) for b in batches(images)])


RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


def verify(saved: SavedModel, files: dict[str, Path], images: torch.Tensor,
           tolerance: float) -> dict[str, Any]:
    """The largest difference in any class probability between each file and PyTorch (and,
    for merged LoRA adapters, between the merged model and the adapter model)."""
    with torch.no_grad():
        reference = torch.cat([saved.model(b) for b in batches(images)]).softmax(-1)
    merge = None
    if saved.adapted is not None:
        with torch.no_grad():
            adapted = torch.cat([saved.adapted(b) for b in batches(images)]).softmax(-1)
        merge = float((adapted - reference).abs().max())
    diffs = {}
    for fmt, path in files.items():
        probs = RUNNERS[fmt](path, images).float().softmax(-1)
        if probs.shape != reference.shape:
            raise UserError(f"{path.name} gives outputs of shape {tuple(probs.shape)}, PyTorch "
                            f"{tuple(reference.shape)}")
        diffs[fmt] = float((probs - reference).abs().max())
    check = {"images": len(images), "tolerance": tolerance, "max_abs_diff": diffs,
             "passed": all(d <= tolerance for d in diffs.values())}
    if merge is not None:
        check["merge_max_abs_diff"] = merge
        check["passed"] = check["passed"] and merge <= tolerance
    return check


# -- the whole export -------------------------------------------------------------------------
def export_run(args: ExportArgs) -> dict[str, Any]:
    """Export, verify and describe: the preprocessing.json record (written too)."""
    if "onnx" in args.formats:  # before any work
        require("onnx", "format=onnx")
        if args.verify:
            require("onnxruntime", "verifying model.onnx")
    saved = load_saved_model(args.checkpoint, args.weights, args.wise, args.run)
    images, source = None, None
    if args.verify:  # read the images first: a missing data set fails before any export
        images, source = (folder_images(saved, args.images, args.samples) if args.images
                          else val_images(saved, args.samples))
    args.output.mkdir(parents=True, exist_ok=True)
    exports: dict[str, Any] = {}
    files: dict[str, Path] = {}
    if "onnx" in args.formats:
        files["onnx"] = args.output / ONNX_FILE
        exports["onnx"] = export_onnx(saved.model, files["onnx"], saved.image_size, args.opset)
    if "torchscript" in args.formats:
        files["torchscript"] = args.output / TORCHSCRIPT_FILE
        exports["torchscript"] = export_torchscript(saved.model, files["torchscript"],
                                                    saved.image_size)
    record = preprocessing(saved, args)
    record["files"] = exports
    record["verification"] = None
    if images is not None:
        record["verification"] = {"source": source,
                                  **verify(saved, files, images, args.tolerance)}
    (args.output / PREPROCESSING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    _remove_stale(args.output, args.formats)
    return record


def _remove_stale(folder: Path, formats: tuple[str, ...]) -> None:
    """A model file of an earlier export in a format not exported now would sit beside a
    preprocessing.json that does not describe it: removed, and said so."""
    for fmt, name in (("onnx", ONNX_FILE), ("torchscript", TORCHSCRIPT_FILE)):
        stale = [p for p in (folder / name, folder / f"{name}.data") if p.is_file()]
        if fmt not in formats and stale:
            for path in stale:
                path.unlink()
            log.warning("removed %s of an earlier export (format=%s this time: "
                        "preprocessing.json describes only what was exported now)",
                        ", ".join(p.name for p in stale), "+".join(formats))
