"""``transferlab-features``: export a backbone's frozen features of a data set to a .npz file
(:mod:`transferlab.tools.features`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transferlab.cli.args import Key, Spec, parse, run_main

SPEC = Spec(
    prog="transferlab-features",
    summary="Export a backbone's features of a dataset (every split: train, val and test when "
            "there is one) to a .npz file: <split>_features, <split>_labels and classes. The "
            "run is composed as transferlab-train composes it, from the same overrides.",
    keys=(
        Key("output", "the .npz file to write", Path, metavar="<file>",
            default_text="features_<dataset>_<backbone>.npz"),
    ),
    overrides="a config override, as for transferlab-train: backbone=..., dataset=..., "
              "dataset.root=..., trainer.device=cpu, +group=option, ~key (every argument "
              "but output=)",
    usage="transferlab-features [output=<file>] [<override> ...]",
    examples=(
        "transferlab-features dataset=hymenoptera output=feats.npz",
        "transferlab-features backbone=resnet18 dataset=image_folder dataset.root=/data/pets",
        "transferlab-features dataset=digits trainer.device=cpu output=digits_lite0.npz",
    ),
)


def run_cli(argv: list[str]) -> int:
    """Compose the run from the overrides, extract its features, save them."""
    args = parse(SPEC, argv)
    from transferlab.config import compose_config, load_config
    from transferlab.tools.features import check_writable, run_features, save_npz

    run = load_config(compose_config(args.overrides), args.overrides)
    out = args["output"] or Path(f"features_{run.dataset.name}_{run.backbone.name}.npz")
    check_writable(out, "output")  # before extracting anything
    splits, arrays = run_features(run)
    save_npz(out, splits, arrays)
    shapes = ", ".join(f"{k} {v[0].shape}" for k, v in arrays.items())
    print(f"{shapes}; {len(splits.classes)} classes\nFeatures saved to: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-features`` entry point; the exit code: 0, 2 after one
    ``error: <message>`` line for a user error, 130 when interrupted."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
