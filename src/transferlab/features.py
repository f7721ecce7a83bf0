"""Frozen-backbone features for classical classifiers.

    transferlab-features dataset=hymenoptera output=hymenoptera_lite0.npz   # export to .npz
    transferlab-features --help                                             # every argument
    transferlab-train head=logreg dataset=hymenoptera                       # a run: LogReg

``transferlab-features`` takes ``output=<file>`` and, as every other argument, the config
overrides of ``transferlab-train`` (:mod:`transferlab.cli`).

The features are the backbone's output, globally average-pooled where it is a feature map,
computed with the eval (deterministic) preprocessing of the composed run config, through the
feature cache (``trainer.feature_cache``: float16 by default, ``dtype=float32`` for full
precision; an export after a run of the same backbone and data reads the run's entries).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

from transferlab.cli import Key, Spec, parse, run_main
from transferlab.config import (
    AugmentConfig,
    RunConfig,
    compose_config,
    load_config,
)
from transferlab.data import DataSplits, build_splits
from transferlab.errors import UserError
from transferlab.feature_cache import extract_splits
from transferlab.runtime import pick_device

log = logging.getLogger("transferlab")


def run_features(run: RunConfig) -> tuple[DataSplits, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The run's data splits and, per split, its (features, labels); training images go
    through the eval preprocessing (frozen features are not augmented). The backbone is built
    (and ``backbone.init`` restored) as a run builds it."""
    from transferlab.run.build import build_backbone_of

    backbone, _, size, _ = build_backbone_of(run)
    splits = build_splits(run.dataset, AugmentConfig(), backbone.input, size)
    return splits, extract_splits(backbone, splits, run.trainer,
                                  pick_device(run.trainer.device), size)


def check_writable(path: Path, key: str) -> None:
    """``path`` can be written: its folder exists (or is created) and takes a file."""
    folder = path.expanduser().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{path.name}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{key}={path}: cannot write in {folder} ({exc.strerror or exc}): "
                        "choose a writable folder") from None


def save_npz(path: Path, splits: DataSplits,
             arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """``<split>_features``, ``<split>_labels`` for each split, and ``classes``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"classes": np.array(splits.classes)}
    for name, (x, y) in arrays.items():
        payload[f"{name}_features"], payload[f"{name}_labels"] = x, y
    np.savez_compressed(path, **payload)
    return path


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
