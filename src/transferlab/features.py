"""Frozen-backbone features for classical classifiers.

    transferlab-features dataset=hymenoptera output=hymenoptera_lite0.npz   # export to .npz
    transferlab-features --help                                             # every argument
    transferlab-train head=logreg dataset=hymenoptera                       # a run: LogReg

``transferlab-features`` takes ``output=<file>`` and, as every other argument, the config
overrides of ``transferlab-train`` (:mod:`transferlab.cli`).

The features are the backbone's output, globally average-pooled where it is a feature map,
computed with the eval (deterministic) preprocessing of the composed run config.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferlab.backbones import Backbone, build_backbone, probe_features
from transferlab.cli import Key, Spec, parse, run_main
from transferlab.config import AugmentConfig, RunConfig, load_config
from transferlab.data import DataSplits, build_splits
from transferlab.errors import UserError, error_line
from transferlab.restore_init import restore_into
from transferlab.runtime import pick_device

log = logging.getLogger("transferlab")


def extract(backbone: Backbone, dataset: Dataset, batch_size: int,
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,) int64) of every item of ``dataset``, in order."""
    module = backbone.module.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            out = module(x.to(device))
            feats.append((out.mean(dim=(2, 3)) if out.ndim == 4 else out.flatten(1)).float()
                         .cpu().numpy())
            labels.append(np.asarray(y, dtype=np.int64))
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(labels)


def run_features(run: RunConfig) -> tuple[DataSplits, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The run's data splits and, per split, its (features, labels); training images go
    through the eval preprocessing (frozen features are not augmented)."""
    backbone = build_backbone(run.backbone)
    if run.backbone.init.path:  # your own weights, as a classifier run would restore them
        restore_into(backbone.module, run.backbone.init)
    size = run.dataset.image_size or backbone.input.size
    probe_features(backbone, size)
    splits = build_splits(run.dataset, AugmentConfig(name="none"), backbone.input, size)
    device = pick_device(run.trainer.device)
    batch = run.trainer.eval_batch_size or 2 * run.trainer.batch_size
    parts = {"train": splits.train, "val": splits.val}
    if splits.test is not None:
        parts["test"] = splits.test
    return splits, {name: extract(backbone, ds, batch, device) for name, ds in parts.items()}


def save_npz(path: Path, splits: DataSplits,
             arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """``<split>_features``, ``<split>_labels`` for each split, and ``classes``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"classes": np.array(splits.classes)}
    for name, (x, y) in arrays.items():
        payload[f"{name}_features"], payload[f"{name}_labels"] = x, y
    np.savez_compressed(path, **payload)
    return path


def fit_logreg(arrays: dict[str, tuple[np.ndarray, np.ndarray]], c: float, max_iter: int,
               seed: int) -> dict:
    """Scikit-learn's LogisticRegression on standardised train features; train/val accuracy
    and log loss (the metrics of a run's epoch)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xt, yt), (xv, yv) = arrays["train"], arrays["val"]
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    started = time.perf_counter()
    model.fit(xt, yt)
    labels = np.arange(int(max(yt.max(), yv.max())) + 1)
    out = {"seconds": time.perf_counter() - started, "model": model}
    for split, (x, y) in (("train", (xt, yt)), ("val", (xv, yv))):
        proba = model.predict_proba(x)
        full = np.zeros((len(x), len(labels)))
        full[:, model.classes_] = proba
        full /= full.sum(axis=1, keepdims=True)
        out[f"{split}_acc"] = float((full.argmax(1) == y).mean())
        out[f"{split}_loss"] = float(log_loss(y, full, labels=labels))
    return out


def train_logreg(run: RunConfig, run_dir: Path, hparams: dict) -> dict:
    """A run whose head is scikit-learn's LogisticRegression on frozen features
    (``head=logreg``): recorded like any run (one epoch, stage ``logreg``) in metrics.json and
    TensorBoard; the fitted pipeline is pickled to ``logreg.pkl``."""
    import pickle

    from transferlab.tracking import RunTracker

    tracker = RunTracker(run_dir, run.raw, hparams)
    with tracker.recording(None):
        splits, arrays = run_features(run)
        fit = fit_logreg(arrays, run.head.C, run.head.max_iter, run.seed)
        dim = arrays["train"][0].shape[1]
        tracker.params = {"total": dim * len(splits.classes) + len(splits.classes),
                          "trainable": dim * len(splits.classes) + len(splits.classes)}
        tracker.extra["data"] = {"train": len(splits.train), "val": len(splits.val),
                                 "classes": splits.classes}
        tracker.log_epoch({"epoch": 1, "stage": "logreg",
                           "train_loss": fit["train_loss"], "train_acc": fit["train_acc"],
                           "val_loss": fit["val_loss"], "val_acc": fit["val_acc"],
                           "lr": {}, "seconds": round(fit["seconds"], 3)}, 0)
        log.info("logistic regression on %d frozen %s features of %d images: train acc "
                 "%.4f, val acc %.4f, val loss %.4f (fit in %.1fs)", dim, run.backbone.name,
                 len(splits.train), fit["train_acc"], fit["val_acc"], fit["val_loss"],
                 fit["seconds"])
        with (run_dir / "logreg.pkl").open("wb") as f:
            pickle.dump({"model": fit["model"], "classes": splits.classes}, f)
    metrics = tracker.metrics
    return metrics


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
    from hydra import compose, initialize_config_module

    args = parse(SPEC, argv)
    try:
        with initialize_config_module(config_module="transferlab.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=args.overrides)
        run = load_config(cfg)
        splits, arrays = run_features(run)
    except Exception as exc:  # Hydra's override errors
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            raise UserError(error_line(exc)) from None
        raise
    out = args["output"] or Path(f"features_{run.dataset.name}_{run.backbone.name}.npz")
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
