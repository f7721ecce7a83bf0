"""``transferlab-lr-find``: a learning-rate range test for one stage of the freeze policy
(:mod:`transferlab.tools.lr_find`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transferlab.choices import LR_RULE_TEXT, LR_RULES
from transferlab.cli.args import Key, Spec, boolean, number, parse, positive_int, run_main
from transferlab.errors import UserError

# -- the command ---------------------------------------------------------------------------------
SPEC = Spec(
    prog="transferlab-lr-find",
    summary="A learning-rate range test for one stage of the freeze policy: the run is "
            "composed and built as transferlab-train builds it; the stage's trainable "
            "parameters, BatchNorm modes and optimizer groups are applied; the base LR "
            "(optimizer.lr) grows exponentially from start_lr to end_lr, one training batch a "
            "step, every group keeping its LR multiplier; the sweep stops when the smoothed "
            "loss exceeds diverge x its best. The model and optimizer are restored afterwards. "
            "Writes lr_find.json, lr_find.png and TensorBoard scalars, and prints the "
            "suggested base LR.",
    keys=(
        Key("stage", "the stage to probe: its number (from 1, as a run's stage table prints "
            "it) or name", metavar="<number|name>",
            default_text="the first stage that trains anything"),
        Key("start_lr", "the first base LR", number, 1e-7),
        Key("end_lr", "the last base LR", number, 10.0),
        Key("steps", "training batches of the sweep (at most)", positive_int, 200),
        Key("smooth", "weight of each new loss in the moving average", number, 0.05),
        Key("diverge", "stop when the smoothed loss exceeds diverge x its best", number, 4.0),
        Key("rule", "how the LR is suggested: steepest = the smoothed loss's steepest descent "
            "(before its minimum), min10 = a tenth of the LR at its minimum", default="steepest",
            choices=LR_RULES),
        Key("warmup", "first train the stages before this one as the policy says (false: the "
            "model as built, as fastai and torch-lr-finder do)", boolean, False),
        Key("apply", "also print the override(s) that set the suggested LR", boolean, False),
        Key("output", "the folder to write into", Path, metavar="<dir>",
            default_text="outputs/lr_find/<date>/<time>_<name>-<stage>"),
    ),
    overrides="a config override, as for transferlab-train: backbone=..., freeze=..., "
              "dataset=..., optimizer=..., trainer.batch_size=... (every other argument)",
    usage="transferlab-lr-find [stage=<number|name>] [start_lr=X] [end_lr=X] [steps=N] ... "
          "[<override> ...]",
    examples=(
        "transferlab-lr-find dataset=hymenoptera freeze=two_stage stage=finetune",
        "transferlab-lr-find freeze=two_stage stage=2 warmup=true apply=true",
        "transferlab-lr-find backbone=resnet18 freeze=discriminative end_lr=1 steps=100",
    ),
)


def run_cli(argv: list[str]) -> int:
    args = parse(SPEC, argv)
    from transferlab.config import compose_config, load_config
    from transferlab.infra.run_dirs import claim
    from transferlab.tools.lr_find import apply_hint, lr_find, write_outputs

    run = load_config(compose_config(args.overrides), args.overrides)
    settings = {k: args[k] for k in ("start_lr", "end_lr", "steps", "smooth", "diverge",
                                     "warmup")}
    result = lr_find(run, args["stage"], rule=args["rule"], **settings)
    out = args["output"] or Path(claim(
        f"outputs/lr_find/{time.strftime('%Y-%m-%d')}/{time.strftime('%H-%M-%S')}_"
        f"{run.name}-{result.stage.name}"))
    try:
        write_outputs(result, out, {**settings, "overrides": args.overrides},
                      f"{run.name}: stage {result.stage.index + 1} {result.stage.name}")
    except OSError as exc:
        raise UserError(f"output={out}: cannot write ({exc.strerror or exc})") from None
    test = result.test
    swept = (f"{len(test.lrs)} steps, {test.lrs[0]:.1e}..{test.lrs[-1]:.1e}, {test.stopped}"
             if test.lrs else f"0 steps, {test.stopped}")
    if result.suggestion is None:
        print(f"lr_find: no suggestion for stage {result.stage.name} ({swept}): the loss did not "
              "fall long enough; try a lower start_lr or more steps")
    else:
        print(f"lr_find: suggested optimizer.lr={result.suggestion:.3g} for stage "
              f"{result.stage.index + 1} {result.stage.name} (rule {result.rule}: "
              f"{LR_RULE_TEXT[result.rule]}; {swept})")
        if args["apply"]:
            print("use: " + "\n  or: ".join(apply_hint(run, result)))
    print(f"Saved to: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-lr-find`` entry point: 0, 2 after one ``error:`` line, 130."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
