"""Shifted test sets a user gives (``dataset.extra_test={name: folder}``), evaluated at the end of
a classification run beside val.

Each folder holds class folders named as the run's classes (all of them or some: a shifted set
may cover fewer classes); a folder with another name is a one-line error when the run starts,
before any epoch. At the end of the run the weights of ``best.pt`` (the model the run's val
predictions come from, handed over by :class:`~transferlab.run.hooks.RecordPredictions`:
not restored a second time) are scored on every set through the run's eval transform; the results
go to ``metrics.json["extra_test"][<name>]`` (``acc``, ``loss``, ``samples``, ``epoch``,
``checkpoint``, ``root``) and TensorBoard (``extra_test/<name>/acc`` and ``.../loss`` at the
best epoch).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.data.extra_test import extra_test_set
from transferlab.data.image_folder import ImageFileDataset

if TYPE_CHECKING:
    from transferlab.run.build import BuiltRun
    from transferlab.run.record import RunTracker

log = logging.getLogger("transferlab")


class ExtraTests:
    """``dataset.extra_test``: its sets indexed (and checked) when built; :meth:`score` scores
    them with the model holding ``best.pt``'s weights (rank 0, after the last stage)."""

    def __init__(self, built: BuiltRun, tracker: RunTracker):
        from transferlab.data.transforms import eval_transform

        self.built, self.tracker = built, tracker
        dataset = built.run.dataset
        transform = eval_transform(built.backbone.input, built.image_size, dataset.crop_pct)
        classes = [str(c) for c in built.splits.classes]
        self.sets = {name: extra_test_set(name, folder, classes, transform)
                     for name, folder in dataset.extra_test.items()}

    def score(self, model) -> None:
        """Every set scored with ``model`` (best.pt's weights, in eval mode)."""
        best = self.tracker.best or {}
        if not self.sets or "epoch" not in best:
            return
        results = {name: self._score(model, dataset, name, best["epoch"])
                   for name, dataset in self.sets.items()}
        self.tracker.extra["extra_test"] = results
        self.tracker.writer.flush()
        log.info("extra test sets, best.pt (epoch %d): %s", best["epoch"], ", ".join(
            f"{name} acc {r['acc']:.4f} ({r['samples']} images)" for name, r in results.items()))

    def _score(self, model, dataset: ImageFileDataset, name: str, epoch: int) -> dict:
        from torch.utils.data import DataLoader

        from transferlab.data import eval_batch_size, loader_workers
        from transferlab.run.predictions import predict

        built, trainer = self.built, self.built.run.trainer
        loader = DataLoader(dataset, batch_size=eval_batch_size(trainer), shuffle=False,
                            num_workers=loader_workers(trainer),
                            pin_memory=built.device.type == "cuda")
        ctx = built.context
        pred = predict(model, loader, ctx.device, ctx.precision, ctx.channels_last)
        self.tracker.writer.add_scalar(f"extra_test/{name}/acc", pred.accuracy, epoch)
        self.tracker.writer.add_scalar(f"extra_test/{name}/loss", pred.loss, epoch)
        return {"acc": pred.accuracy, "loss": pred.loss, "samples": len(pred.targets),
                "epoch": epoch, "checkpoint": "best",
                "root": str(Path(os.path.expanduser(built.run.dataset.extra_test[name])))}
