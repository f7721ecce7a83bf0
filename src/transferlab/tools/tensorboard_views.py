"""TensorBoard records that span runs, written at the root of a sweep (or of any set of runs):

- **the union HParams experiment**: one experiment record whose columns are every hparam of
  every run (and the summary metrics), in its own event file at the root. TensorBoard's HParams
  dashboard takes its columns from one experiment record; without it, a logdir holding runs of
  different kinds (a classifier and an autoencoder) shows only one kind's columns;
- **seed groups**: for runs that differ only by ``seed``, runs ``seed_groups/<group>/mean``,
  ``.../min`` and ``.../max`` holding per epoch the mean and the band of their train/val loss
  and accuracy, so seed noise shows in the Scalars tab next to the runs themselves.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from transferlab.run.record import HPARAM_METRICS

SUFFIX = ".hparams_union"
GROUPS_DIR = "seed_groups"
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")


def _domain(values: list):
    from tensorboard.plugins.hparams import summary_v2 as hp

    if all(isinstance(v, bool) for v in values):
        return hp.Discrete([False, True])
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        floats = sorted({float(v) for v in values if math.isfinite(float(v))})
        return hp.Discrete(floats) if floats else None
    return hp.Discrete(sorted({str(v) for v in values}))


def write_union_hparams(root: Path, hparams: Sequence[dict]) -> Path | None:
    """The experiment record of ``hparams`` (one dict per run) at ``root``, replacing the one
    written there before; None when no run has hparams."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    names: dict[str, list] = {}
    for run in hparams:
        for name, value in run.items():
            names.setdefault(name, []).append(value)
    if not names:
        return None
    differ = {name for name, values in names.items()
              if len(values) < len(hparams) or len({repr(v) for v in values}) > 1}
    columns = []
    for name in sorted(names, key=lambda n: (n not in differ, n)):  # what was swept first
        domain = _domain(names[name])
        columns.append(hp.HParam(name, domain) if domain is not None else hp.HParam(name))
    metrics = [hp.Metric(f"hparam/{m}", display_name=m) for m in HPARAM_METRICS]
    for old in root.glob(f"events.out.tfevents.*{SUFFIX}"):
        old.unlink()
    writer = SummaryWriter(log_dir=str(root), filename_suffix=SUFFIX)
    writer.file_writer.add_summary(_marking_differs(hp.hparams_config_pb(columns, metrics),
                                                    differ))
    writer.close()
    return next(root.glob(f"events.out.tfevents.*{SUFFIX}"))


def _marking_differs(summary, differ: set[str]):
    """The experiment record with ``differs`` set on the hparams whose values are not the same
    in every run (TensorBoard's HParams table shows those columns first; ``hparams_config_pb``
    leaves it false, and TensorBoard then shows the first five keys by name, hiding the swept
    one)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    value = summary.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in differ
    value.metadata.plugin_data.content = data.SerializeToString()
    return summary


def group_curves(histories: Sequence[list[dict]]) -> dict[str, dict[int, tuple]]:
    """Per curve, per epoch that every run reached: (mean, min, max) over the runs."""
    out: dict[str, dict[int, tuple]] = {}
    epochs = set.intersection(*({r["epoch"] for r in h} for h in histories)) if histories \
        else set()
    for curve in CURVES:
        points = {}
        for epoch in sorted(epochs):
            values = [next(r for r in h if r["epoch"] == epoch).get(curve) for h in histories]
            values = [float(v) for v in values if v is not None]
            if len(values) == len(histories):
                points[epoch] = (statistics.fmean(values), min(values), max(values))
        if points:
            out[curve] = points
    return out


def write_seed_groups(root: Path, groups: dict[str, Sequence[list[dict]]]) -> list[Path]:
    """``<root>/seed_groups/<label>/{mean,min,max}`` for each group of 2 or more runs (the
    folder is rewritten whole)."""
    target = root / GROUPS_DIR
    shutil.rmtree(target, ignore_errors=True)
    written = []
    for label, histories in groups.items():
        if len(histories) < 2:
            continue
        curves = group_curves(histories)
        for i, stat in enumerate(("mean", "min", "max")):
            folder = target / label / stat
            writer = SummaryWriter(log_dir=str(folder))
            for curve, points in curves.items():
                split, _, metric = curve.partition("_")
                for epoch, values in points.items():
                    writer.add_scalar(f"{split}/{metric}", values[i], epoch)
            writer.close()
            written.append(folder)
    return written
