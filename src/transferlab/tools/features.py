"""Frozen-backbone features for classical classifiers.

    transferlab-features dataset=hymenoptera output=hymenoptera_lite0.npz   # export to .npz
    transferlab-features --help                                             # every argument
    transferlab-train task=logreg dataset=hymenoptera                       # a run: LogReg

``transferlab-features`` takes ``output=<file>`` and, as every other argument, the config
overrides of ``transferlab-train`` (:mod:`transferlab.cli.args`).

The features are the backbone's output, globally average-pooled where it is a feature map,
computed with the eval (deterministic) preprocessing of the composed run config, through the
feature cache (``trainer.feature_cache``: float16 by default, ``dtype=float32`` for full
precision; an export after a run of the same backbone and data reads the run's entries).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from transferlab.config import (
    AugmentConfig,
    RunConfig,
)
from transferlab.data import DataSplits, build_splits
from transferlab.errors import UserError
from transferlab.feature_cache import extract_splits
from transferlab.infra.runtime import pick_device

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
    """``<split>_features``, ``<split>_labels`` for each split, and ``classes``, written to a
    temporary file renamed over ``path`` once complete: a full disk (a one-line error) or a
    kill leaves an earlier ``path`` as it was, and no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"classes": np.array(splits.classes)}
    for name, (x, y) in arrays.items():
        payload[f"{name}_features"], payload[f"{name}_labels"] = x, y
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"output={path}: cannot write it ({exc.strerror or exc}): free space "
                        "in its folder, or choose another output=") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
