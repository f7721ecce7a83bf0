"""``transferlab-rank``: rank backbones and their blocks for a data set by transferability
scores of their frozen features, before training any of them (:mod:`transferlab.tools.rank`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transferlab.cli.args import Key, Spec, boolean, integer, parse, run_main
from transferlab.errors import UserError, did_you_mean
from transferlab.tools.scores import RANK_SCORES

OFFLINE_ZOO = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
EXIT_FAILED = 1


def names(text: str) -> list[str]:
    """A comma-separated list of names."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("expected one name or more, separated by commas")
    return items


def score_names(text: str) -> list[str]:
    items = names(text)
    for item in items:
        if item not in RANK_SCORES:
            raise ValueError(f"unknown score {item!r}{did_you_mean(item, RANK_SCORES)}; "
                             f"choose from {', '.join(RANK_SCORES)}")
    return items


def folders(text: str) -> list[Path]:
    """Comma-separated folders; ``none``: no folder."""
    return [] if text.strip() == "none" else [Path(t) for t in names(text)]


def batches(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


SPEC = Spec(
    prog="transferlab-rank",
    summary="Rank candidate backbones (and the features after each of their blocks) for a "
            "data set by transferability scores of their frozen features on the training "
            "split, without fine-tuning; the features go through the feature cache, so a "
            "second call, or a sweep over the same backbones, starts warm. Prints the ranked "
            "table and a suggested next command; writes rank.json, rank.md, rank.png and "
            "TensorBoard text to output=.",
    keys=(
        Key("backbones", "comma-separated presets (conf/backbone) or torchvision / timm "
            "model names", names, default=names(OFFLINE_ZOO), metavar="<a,b,...>",
            default_text=f"the offline zoo {OFFLINE_ZOO}"),
        Key("blocks", "also score the pooled features after every block of each backbone",
            boolean, default=True),
        Key("rgn_batches", "with blocks=true: each block's relative gradient norm (Auto-RGN) "
            "on this many batches of 16 training images, under a linear head fitted on the "
            "features (0: not measured)", batches, default=0, metavar="N"),
        Key("scores", f"comma-separated scores, the first ranks: {', '.join(RANK_SCORES)}",
            score_names, default=["logme"], metavar="<a,b,...>", default_text="logme"),
        Key("output", "the folder of rank.json, rank.md, rank.png", Path, metavar="<dir>",
            default_text="outputs/rank/<date>/<time>_<dataset>"),
        Key("against", "comma-separated folders of runs or sweeps trained before (none: "
            "not read): each score's Kendall tau against the best val accuracy its "
            "backbones reached there on the same data set", folders, default=[Path("outputs")],
            metavar="<dir,...>|none", default_text="outputs"),
    ),
    overrides="a config override, as for transferlab-train: dataset=..., dataset.root=..., "
              "dataset.train_fraction=0.1, dataset.folds=5 dataset.fold=0, "
              "dataset.image_size=..., trainer.device=cpu (not backbone=: use backbones=)",
    usage="transferlab-rank [backbones=<a,b,...>] [blocks=true|false] [rgn_batches=N] "
          "[scores=<a,b,...>] [output=<dir>] [against=<dir,...>|none] [<override> ...]",
    examples=(
        "transferlab-rank dataset=hymenoptera",
        "transferlab-rank dataset=hymenoptera backbones=efficientnet_lite0,resnet18 "
        "scores=logme,leep,probe blocks=false",
        "transferlab-rank dataset=digits dataset.train_fraction=0.1 rgn_batches=2 "
        "output=rank_digits",
    ),
    notes=("exit code 1: a backbone could not be scored (its row says why; the others are "
           "in the table).",),
)


def run_cli(argv: list[str]) -> int:
    """Compose the run from the overrides, score every backbone, show and write the report."""
    args = parse(SPEC, argv)
    given_backbone = [o for o in args.overrides if o.split("=")[0].lstrip("+~") == "backbone"]
    if given_backbone:
        raise UserError(f"{given_backbone[0]}: transferlab-rank takes backbones=<a,b,...> "
                        "(one or more), not backbone=")
    fields = [o for o in args.overrides if o.split("=")[0].lstrip("+~").startswith("backbone.")]
    if fields:
        raise UserError(f"{fields[0]}: transferlab-rank builds each of backbones= as its preset "
                        "and would not apply it; drop it (the block rows score the features "
                        "after every block, as backbone.cut would give)")
    if args["rgn_batches"] and not args["blocks"]:
        raise UserError(f"rgn_batches={args['rgn_batches']} measures blocks: drop "
                        "blocks=false, or rgn_batches=")
    from transferlab.config import compose_config, load_config
    from transferlab.tools.rank import rank
    from transferlab.tools.rank_report import console_text, report, write_report

    run = load_config(compose_config(args.overrides), args.overrides)
    out = args["output"] or (Path("outputs/rank") / time.strftime("%Y-%m-%d")
                             / f"{time.strftime('%H-%M-%S')}_{run.dataset.name}")
    started = time.perf_counter()
    rows = rank(run, args["backbones"], args["scores"], args["blocks"], args["rgn_batches"])
    seconds = time.perf_counter() - started
    from transferlab.tools.rank_history import before, before_text

    past = before(rows, args["scores"], run.dataset.name, args["against"])
    rep = report(rows, args["scores"], args.overrides,
                 before_text(past, args["against"]) if past else None)
    write_report(out, rows, rep, seconds)
    print(console_text(rep))
    print(f"Report saved to: {out} (rank.md, rank.json, rank.png; {seconds:.0f} s)", flush=True)
    return EXIT_FAILED if any(r.error for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-rank`` entry point; the exit code: 0, 1 when a backbone could not
    be scored, 2 after one ``error: <message>`` line for a user error, 130 when interrupted."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
