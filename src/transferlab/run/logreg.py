"""``task=logreg``: scikit-learn's LogisticRegression on the frozen backbone's pooled
features, in closed form instead of the staged loop (one record "epoch")."""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import numpy as np

from transferlab.feature_cache import extract_splits
from transferlab.run.build import BuiltRun
from transferlab.run.record import RunTracker

log = logging.getLogger("transferlab")


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


def fit_logreg_head(built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
    """``task=logreg``: scikit-learn's LogisticRegression on the frozen backbone's features of
    the training images (eval preprocessing); recorded as one epoch (stage ``logreg``); the
    fitted pipeline is pickled to ``logreg.pkl``."""
    run, splits = built.run, built.splits
    arrays = extract_splits(built.backbone, splits, run.trainer, built.device,
                            built.image_size, built.feature_cache, "logreg")
    tracker.extra["feature_cache"] = built.feature_cache.report
    fit = fit_logreg(arrays, run.task.C, run.task.max_iter, run.seed)
    dim, k = arrays["train"][0].shape[1], len(splits.classes)
    tracker.params = {"total": dim * k + k, "trainable": dim * k + k}
    tracker.log_epoch({"epoch": 1, "stage": "logreg",
                       "train_loss": fit["train_loss"], "train_acc": fit["train_acc"],
                       "val_loss": fit["val_loss"], "val_acc": fit["val_acc"],
                       "lr": {}, "seconds": round(fit["seconds"], 3)}, 0)
    log.info("logistic regression on %d frozen %s features of %d images: train acc %.4f, val "
             "acc %.4f, val loss %.4f (fit in %.1fs)", dim, run.backbone.name, len(splits.train),
             fit["train_acc"], fit["val_acc"], fit["val_loss"], fit["seconds"])
    if built.world.main:
        with (run_dir / "logreg.pkl").open("wb") as f:
            pickle.dump({"model": fit["model"], "classes": splits.classes}, f)
