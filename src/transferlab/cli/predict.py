"""``transferlab-predict``: predict the classes of image files with a run or an ImageNet backbone
(:mod:`transferlab.tools.predict`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.choices import CHECKPOINTS, TTA_HELP, TTA_MODES, WEIGHTS
from transferlab.cli.args import Key, Prefix, Spec, parse, positive_int, run_main, yaml_value
from transferlab.errors import UserError
from transferlab.registry import BACKBONE_SOURCES

if TYPE_CHECKING:
    from transferlab.tools.predict import Inputs

IMAGENET_ONLY, RUN_ONLY = ("top_k", "backbone_source"), ("checkpoint", "output", "weights")

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
    prefixes=(Prefix("backbone.", "with backbone=: a field of the backbone's config, e.g. "
                     "backbone.weights_path=<file> (its weights from a file: no download)"),),
    positionals="PATH",
    positional_help="image files or folders (searched recursively)",
    positionals_required=True,
    notes=("A path whose text before its first '=' looks like a key (cat=1.jpg) is read as "
           "key=value: write it as ./cat=1.jpg.",),
    examples=(
        "transferlab-predict backbone=efficientnet_lite0 top_k=3 cat.jpg photos/",
        "transferlab-predict backbone=resnet18 backbone.weights_path=resnet18.pth cat.jpg",
        "transferlab-predict run=outputs/runs/2026-11-23/10-00-00_digits-efficientnet_lite0-"
        "linear_probe photos/",
        "transferlab-predict run=<run dir> checkpoint=last tta=flip output=preds.csv photos/",
    ),
)


@dataclass
class PredictArgs:
    """The parsed command line: ``backbone`` or ``run`` (exactly one is set)."""

    paths: list[str]
    backbone: str | None = None
    run: Path | None = None
    backbone_source: str | None = None
    backbone_fields: dict = field(default_factory=dict)  # backbone.<field>=<value>
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
    if "run" in given and parsed.prefixed:
        extra.append(f"{next(iter(parsed.prefixed))}")
    if extra:
        keys = " and ".join(f"{k}=" for k in extra)
        raise UserError(f"{keys} {'go' if len(extra) > 1 else 'goes'} with {other}=, "
                        f"not with {mode}=")
    fields = {key.removeprefix("backbone."): yaml_value(value)
              for key, value in parsed.prefixed.items()}
    return PredictArgs(paths=parsed.positionals, backbone_fields=fields,
                       **{k: parsed[k] for k in SPEC.key_names})


def imagenet_mode(args: PredictArgs, inputs: Inputs) -> None:
    """Print the top-k ImageNet classes of each image."""
    from transferlab.infra.runtime import pick_device
    from transferlab.tools.predict import format_top_k, imagenet_predictor, predict
    from transferlab.tools.tta import describe

    predictor = imagenet_predictor(args.backbone, args.backbone_source, args.tta,
                                   args.backbone_fields)
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
    from transferlab.infra.runtime import pick_device
    from transferlab.tools.predict import predict, run_predictor, write_csv
    from transferlab.tools.tta import describe

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
    from transferlab.tools.predict import gather_inputs, skipped_warning

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
