"""``transferlab-eval``: evaluate a run's checkpoint on a split (:mod:`transferlab.tools.evaluate`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transferlab.choices import (
    CHECKPOINTS,
    EVAL_SPLITS,
    TTA_HELP,
    TTA_MODES,
    WEIGHTS,
    alphas,
    severities,
)
from transferlab.cli.args import Key, Prefix, Spec, integer, parse, run_main, yaml_value
from transferlab.errors import UserError


def corruption_names(text: str) -> tuple[str, ...]:
    """:func:`transferlab.tools.corruptions.corruption_names`, imported when a value is given."""
    from transferlab.tools.corruptions import corruption_names as names

    return names(text)


# -- command line -------------------------------------------------------------------------------
SPEC = Spec(
    prog="transferlab-eval",
    summary="Evaluate a saved checkpoint of a run on one of its data splits. Writes eval.json, "
            "eval_confusion_matrix.png, eval_predictions.npz and TensorBoard records into the run "
            "directory (or output=), and "
            "prints accuracy, loss and a per-class table.",
    keys=(
        Key("run", "a run directory written by transferlab-train", Path, required=True,
            metavar="<run dir>"),
        Key("checkpoint", "which checkpoint of the run", default="best", choices=CHECKPOINTS),
        Key("split", f"which split to evaluate on: {', '.join(EVAL_SPLITS)} or the name of "
            "one of the run's dataset.extra_test sets (add one with dataset.extra_test.<name>="
            "<folder>)", default="val", metavar="|".join((*EVAL_SPLITS, "<name>"))),
        Key("weights", "the trained weights (raw) or their EMA (ema: runs trained with "
            "trainer.ema.decay)", default="raw", choices=WEIGHTS),
        Key("device", "auto, cpu, cuda, cuda:N or mps", metavar="auto|cpu|cuda|...",
            default_text="the run's trainer.device"),
        Key("tta", TTA_HELP, default="none", choices=TTA_MODES),
        Key("corruptions", "also evaluate on ImageNet-C-style corruptions of the split: all "
            "(the 15) or a comma-separated list (needs pip install 'transferlab[robust]')",
            corruption_names, metavar="all|<name>,<name>...", default_text="none"),
        Key("severity", "with corruptions=: the severities, all or a comma-separated list of "
            "1 to 5", severities, default=(1, 2, 3, 4, 5), metavar="all|1-5,...",
            default_text="all"),
        Key("seed", "with corruptions=: seeds their randomness (the same seed, the same images)",
            integer, default=0),
        Key("wise", "WiSE-FT: also evaluate the weights interpolated between the start of "
            "fine-tuning (wise_start.pt) and the checkpoint, at these alphas: "
            "start:stop:step or a comma-separated list", alphas,
            metavar="0:1:0.1|<a>,<b>...", default_text="none"),
        Key("mistakes", "also draw the split's first 16 misclassified images, with Grad-CAM "
            "overlays where grad-cam is installed, into eval_mistakes.png", bool, False),
        Key("output", "the folder to write the evaluation's files and TensorBoard records "
            "into (made if missing), so that those of an earlier evaluation in the run "
            "directory are kept", Path, metavar="<dir>", default_text="the run directory"),
    ),
    prefixes=(Prefix("dataset.", "a field of the run's dataset config, e.g. dataset.root=/data"
                                 "/copy (numbers and true/false are read as YAML)"),),
    examples=(
        "transferlab-eval run=outputs/runs/2026-11-23/10-00-00_digits-efficientnet_lite0-"
        "linear_probe",
        "transferlab-eval run=<run dir> checkpoint=last split=test mistakes=true",
        "transferlab-eval run=<run dir> weights=ema checkpoint=best_ema tta=flip "
        "output=<run dir>/eval_ema_flip",
        "transferlab-eval run=<run dir> wise=0:1:0.1 corruptions=all severity=3",
    ),
)


def parse_args(argv: list[str]):
    """``key=value`` items (like Hydra overrides) -> :class:`~transferlab.tools.evaluate.EvalArgs`;
    mistakes are UserErrors. Torch is imported after the items are read (``--help`` and a
    mistake answer without it)."""
    parsed = parse(SPEC, argv)
    from transferlab.tools.evaluate import EvalArgs
    from transferlab.tools.robustness import RobustnessArgs

    dataset: dict = {}  # dataset.extra_test.<name>=<folder> nests
    for key, value in parsed.prefixed.items():
        *parents, leaf = key.removeprefix("dataset.").split(".")
        node = dataset
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{key}: dataset.{part} is given a value of its own as well")
        node[leaf] = yaml_value(value)
    corruptions = parsed["corruptions"] or ()
    if not corruptions:
        alone = [key for key in ("severity", "seed") if key in parsed.given]
        if alone:
            raise UserError(f"{alone[0]}= goes with corruptions=<names>|all")
    elif parsed["tta"] != "none":
        raise UserError("corruptions= evaluates without test-time augmentation: drop tta=")
    robust = RobustnessArgs(corruptions, parsed["severity"], parsed["seed"],
                            parsed["wise"] or ())
    return EvalArgs(run=parsed["run"], checkpoint=parsed["checkpoint"], split=parsed["split"],
                    weights=parsed["weights"], device=parsed["device"], tta=parsed["tta"],
                    dataset=dataset or None, robust=robust, mistakes=parsed["mistakes"],
                    output=parsed["output"])


def run_cli(argv: list[str]) -> None:
    """Parse, evaluate, write the reports, print the summary."""
    args = parse_args(argv)
    from transferlab.run.predictions import EVAL_PREDICTIONS
    from transferlab.tools.evaluate import evaluate_run, summary_text, tb_tag, write_reports
    from transferlab.tools.robustness import robustness_text, write_robustness

    report = evaluate_run(args)
    json_path, png_path = write_reports(args.out, report, report["classes"])
    tag = tb_tag(args.split, args.tta)
    figures = write_robustness(args.out, report, tag)
    print(summary_text(report))
    if figures:
        print(f"\n{robustness_text(report)}\n\nFigures: {', '.join(map(str, figures))}")
    if args.mistakes:
        from transferlab.tools.mistakes import EVAL_MISTAKES

        print(f"Misclassified images: {args.out / EVAL_MISTAKES}")
    print(f"\nMetrics saved to: {json_path}\nConfusion matrix: {png_path}\n"
          f"Per-image predictions: {args.out / EVAL_PREDICTIONS}\n"
          f"TensorBoard: tensorboard --logdir {args.out / 'tb'} "
          f"(tag eval/{tag}/confusion_matrix)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; the exit code: 0, 2 after one ``error: <message>`` line for a
    user error, 130 when interrupted (:func:`transferlab.cli.args.run_main`)."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
