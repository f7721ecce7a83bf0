"""``transferlab-export``: a run's model as ONNX and TorchScript, checked against PyTorch
(:mod:`transferlab.tools.export`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.choices import (
    CHECKPOINTS,
    DEFAULT_OPSET,
    EXPORT_FORMATS,
    EXPORT_INSTALL,
    EXPORT_NAMES,
    WEIGHTS,
    alpha,
)
from transferlab.cli.args import Key, Spec, parse, positive_int, run_main
from transferlab.errors import EXIT_JOB_FAILED, UserError, did_you_mean

if TYPE_CHECKING:
    from transferlab.tools.export import ExportArgs


def checkpoint_arg(text: str) -> str | Path:
    """``best`` / ``last`` (a checkpoint of ``run=``), or the path of a ``.pt`` file."""
    if text in CHECKPOINTS:
        return text
    if text.endswith(".pt") or "/" in text or os.sep in text:
        return Path(text).expanduser()
    raise ValueError(f"expected {' or '.join(CHECKPOINTS)} (with run=) or the path of a .pt "
                     f"file{did_you_mean(text, CHECKPOINTS)}")


def samples_arg(text: str) -> int | None:
    """A positive count, or ``all`` (None)."""
    return None if text.strip().lower() == "all" else positive_int(text)


def tolerance_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not value > 0:
        raise ValueError("expected a number > 0")
    return value


SPEC = Spec(
    prog="transferlab-export",
    usage="transferlab-export (run=<run dir> | checkpoint=<file.pt>) [key=value ...]",
    summary="Export a trained run's model to ONNX (dynamic batch axis) and TorchScript, with a "
            "preprocessing.json that says how to prepare an image for it, then check that the "
            "exported files give the PyTorch model's class probabilities on real images.",
    keys=(
        Key("run", "a run directory written by transferlab-train", Path, metavar="<run dir>"),
        Key("checkpoint", "with run=: which checkpoint of the run; or, without run=, the path "
            "of a checkpoint file", checkpoint_arg, "best",
            metavar="best|last|best_ema|<file.pt>"),
        Key("weights", "the trained weights (raw) or their EMA (ema: runs trained with "
            "trainer.ema.decay)", default="raw", choices=WEIGHTS),
        Key("wise", "WiSE-FT: export the weights interpolated between the start of "
            "fine-tuning (the run's wise_start.pt: alpha 0) and the checkpoint's "
            "(alpha 1), at this alpha (choose it with transferlab-eval wise=)", alpha,
            metavar="<alpha>", default_text="none: the checkpoint's weights"),
        Key("format", "the files to write: model.onnx, model.ts or both", default="both",
            choices=EXPORT_FORMATS),
        Key("output", "the folder to write into", Path, metavar="<dir>",
            default_text="<run dir>/export"),
        Key("opset", "the ONNX opset version", positive_int, DEFAULT_OPSET),
        Key("verify", "run the exported files on real images and compare with PyTorch", bool,
            True),
        Key("images", "verify on the images in this folder (searched recursively)", Path,
            metavar="<folder>", default_text="the run's val split"),
        Key("samples", "how many images verification runs (spread over the split or folder)",
            samples_arg, 32, metavar="N|all"),
        Key("tolerance", "the largest difference in any class probability that passes",
            tolerance_arg, 1e-4, metavar="X"),
    ),
    notes=(f"ONNX needs the onnx and onnxruntime packages: {EXPORT_INSTALL}.",
           "Exit code 1: verification failed (one line 'error: verification failed: ...'; the "
           "files are kept)."),
    examples=(
        "transferlab-export run=outputs/runs/2026-11-23/10-00-00_hymenoptera-"
        "efficientnet_lite0-linear_probe",
        "transferlab-export run=<run dir> checkpoint=last format=onnx output=deploy/",
        "transferlab-export checkpoint=<run dir>/checkpoints/best.pt images=photos/ samples=all",
        "transferlab-export run=<run dir> wise=0.5 output=deploy-wise/",
    ),
)


VERIFY_ONLY = ("images", "samples", "tolerance")


def parse_args(argv: list[str]) -> ExportArgs:
    """``key=value`` arguments -> :class:`ExportArgs`; mistakes are UserErrors. Torch is
    imported after the items are read (``--help`` and a mistake answer without it)."""
    parsed = parse(SPEC, argv)
    from transferlab.run.saved import checkpoint_path
    from transferlab.tools.export import ExportArgs

    given, checkpoint = parsed.given, parsed["checkpoint"]
    if not parsed["verify"]:
        extra = [k for k in VERIFY_ONLY if k in given]
        if extra:
            keys = " and ".join(f"{k}=" for k in extra)
            raise UserError(f"{keys} {'go' if len(extra) > 1 else 'goes'} with verify=true")
    if "run" in given:
        if isinstance(checkpoint, Path):
            raise UserError("with run=, checkpoint= names one of the run's checkpoints "
                            f"({', '.join(CHECKPOINTS)}): give run= or a checkpoint file, "
                            "not both")
        run_dir = parsed["run"]
        path = checkpoint_path(run_dir, checkpoint)
    elif isinstance(checkpoint, Path):
        if not checkpoint.is_file():
            raise UserError(f"checkpoint file {checkpoint} does not exist")
        path = checkpoint
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    else:
        raise UserError("give run=<run dir> (a directory written by transferlab-train) or "
                        "checkpoint=<file.pt>")
    output = parsed["output"] or (run_dir or path.parent) / "export"
    return ExportArgs(checkpoint=path, output=output, run=run_dir,
                      **{k: parsed[k] for k in ("format", "opset", "verify", "images",
                                                "samples", "tolerance", "weights", "wise")})


def summary_lines(args: ExportArgs, record: dict[str, Any]) -> list[str]:
    from transferlab.tools.export import PREPROCESSING_FILE

    run = record["run"]
    mixed = f", WiSE-FT alpha {run['wise']['alpha']:g}" if run.get("wise") else ""
    lines = [f"Exported {Path(run['checkpoint']).name} (epoch {run['epoch']}{mixed}) of "
             f"{run['dir'] or run['checkpoint']} to {args.output}:"]
    for fmt, info in record["files"].items():
        how = "traced"
        if fmt == "onnx":
            asked = "" if info["opset"] == args.opset else f" (opset={args.opset} asked)"
            how = f"opset {info['opset']}{asked}, dynamic batch, {info['exporter']} exporter"
        lines.append(f"  {EXPORT_NAMES[fmt]:<12} {args.output / info['file']}  ({how})")
    lines.append(f"  {'preprocess':<12} {args.output / PREPROCESSING_FILE}  "
                 f"({record['image_size']} px, {len(record['classes'])} classes)")
    if record.get("lora"):
        lines.append(f"  {'LoRA':<12} {record['lora']['merged']} adapters merged into the "
                     "weights (plain layers, no peft needed to run the files)")
    return lines


def verification_line(check: dict[str, Any]) -> str:
    diffs = ", ".join(f"{EXPORT_NAMES[f]} {d:.1e}" for f, d in check["max_abs_diff"].items())
    if "merge_max_abs_diff" in check:
        diffs += f", merged LoRA vs adapters {check['merge_max_abs_diff']:.1e}"
    return (f"max |probability difference| vs PyTorch on {check['source']}: {diffs} "
            f"(tolerance {check['tolerance']:g})")


def run_cli(argv: list[str]) -> int:
    """Parse, export, verify, print where everything went."""
    args = parse_args(argv)
    from transferlab.run.trackers import log_export
    from transferlab.tools.export import export_run

    record = export_run(args)
    print("\n".join(summary_lines(args, record)), flush=True)
    check = record["verification"]
    if check is not None and not check["passed"]:
        print(f"error: verification failed: {verification_line(check)}; the files are kept "
              f"in {args.output}", file=sys.stderr, flush=True)
        return EXIT_JOB_FAILED
    print("Not verified (verify=false)." if check is None
          else f"Verified: {verification_line(check)}.", flush=True)
    if args.run is not None:  # the run's trackers (MLflow) keep the files with its record
        for tracker, where in log_export(args.run, args.output).items():
            print(f"Logged to {tracker}: {where}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-export`` entry point; the exit code: 0, 1 when the exported files do
    not match PyTorch, 2 after one ``error: <message>`` line for a user error, 130 when
    interrupted."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
