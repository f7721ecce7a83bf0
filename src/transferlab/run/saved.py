"""A finished run's model, rebuilt from its checkpoint: the saved config builds the
architecture, the checkpoint fills every weight. A checkpoint that left out the tensors still
equal to the pretrained weights (:mod:`transferlab.infra.delta`) has them rebuilt from the
backbone's zoo or package and checked; a full one needs no pretrained weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from transferlab.backbones import build_backbone, probe_features
from transferlab.config import RunConfig, load_config
from transferlab.errors import UserError
from transferlab.infra.delta import complete, is_delta
from transferlab.registry import TASKS
from transferlab.run.build import build_classifier
from transferlab.run.resume import read_status


def checkpoint_path(run_dir: Path, name: str) -> Path:
    """``<run>/checkpoints/<name>.pt``, checked to exist."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    path = run_dir / "checkpoints" / f"{name}.pt"
    if not path.is_file() and (run_dir / "logreg.pkl").is_file():
        raise UserError(f"{run_dir} is a task=logreg run: a logistic regression on frozen "
                        "features (logreg.pkl), with no network checkpoint; its val accuracy is "
                        "in its metrics.json, and transferlab-features exports the features to "
                        "fit it again")
    if not path.is_file():
        saved = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.pt"))
        done = len(read_status(run_dir).get("history") or [])
        have = (f"it has: {', '.join(saved)}" if saved else
                f"none is left, though metrics.json records {done} finished epoch(s) (deleted "
                "or moved?)" if done else "the run saved none (no epoch finished)")
        raise UserError(f"no checkpoint {name}.pt in {run_dir / 'checkpoints'}: {have}")
    return path


def checkpoint_weights(ckpt: dict, weights: str, path: Path) -> dict:
    """The state dict of a checkpoint's ``weights``: ``raw`` (the trained weights) or ``ema``
    (their exponential moving average, kept by runs with ``trainer.ema.decay``)."""
    if weights != "ema":
        return ckpt["model"]
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("model"), dict):
        raise UserError(f"weights=ema: {path} holds no EMA of the weights (the run trained "
                        "without trainer.ema.decay): use weights=raw")
    return ema["model"]


def merged(saved: dict, overrides: dict) -> dict:
    """``saved`` with ``overrides`` applied key by key, into nested dicts (a new
    ``extra_test`` set beside the run's own)."""
    out = dict(saved)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def saved_run_config(saved: Any, dataset_overrides: dict[str, Any] | None = None,
                     pretrained: bool = False) -> RunConfig:
    """The run's saved config with ``dataset.*`` overrides applied, no ``backbone.init`` and
    no weights file; pretrained weights off, unless ``pretrained`` (the checkpoint left them
    out: they are built as the run built them)."""
    if not isinstance(saved, dict):
        raise UserError("the checkpoint holds no run config (not written by transferlab-train?)")
    raw = copy.deepcopy(saved)
    if isinstance(raw.get("backbone"), dict):  # every other weight comes from the checkpoint
        raw["backbone"].update(pretrained=pretrained and bool(raw["backbone"].get("pretrained")),
                               weights_path=None)
        if isinstance(raw["backbone"].get("init"), dict):
            raw["backbone"]["init"]["path"] = None
    if dataset_overrides and isinstance(raw.get("dataset"), dict):
        raw["dataset"] = merged(raw["dataset"], dataset_overrides)
    run = load_config(raw)  # unknown dataset.<field> keys are one-line errors here
    task = TASKS.builder(run.task.name)
    if not task.has_classes:
        raise UserError(task.not_a_classifier)
    return run


def checkpoint_config(ckpt: dict,
                      dataset_overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config a checkpoint's model is rebuilt from (:func:`saved_run_config`): with the
    run's pretrained weights where the checkpoint left them out."""
    return saved_run_config(ckpt.get("config"), dataset_overrides, pretrained=is_delta(ckpt))


def restore_saved(run: RunConfig, ckpt: dict, path: Path, weights: str,
                  num_classes: int) -> tuple[nn.Module, Any, int]:
    """:func:`restore_model` of a loaded checkpoint's ``weights`` (raw or ema), ``run`` being
    its :func:`checkpoint_config`."""
    source = ckpt["source"] if is_delta(ckpt) else None
    return restore_model(run, checkpoint_weights(ckpt, weights, path), num_classes, source, path)


def restore_model(run: RunConfig, state: dict, num_classes: int, source: dict | None = None,
                  path: Path | None = None) -> tuple[nn.Module, Any, int]:
    """(model with the checkpoint's weights in eval mode, backbone, image size), built the way
    :func:`transferlab.run.train` builds it. ``source``: the checkpoint's record of the
    pretrained tensors it left out (``run`` then builds the pretrained backbone): they are put
    back, each checked against its fingerprint."""
    try:
        backbone = build_backbone(run.backbone)
    except UserError as exc:
        if source is None:
            raise
        raise UserError(f"{path} leaves out the tensors equal to its pretrained weights "
                        f"({source.get('weights')}), which are built again: {exc}") from None
    if source is not None:
        state = complete(state, source, backbone.module.state_dict(), str(path))
    image_size = run.dataset.image_size or backbone.input.size
    feature_shape = probe_features(backbone, image_size)
    model = build_classifier(run, backbone, feature_shape, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"the checkpoint's weights do not fit the model of its config ({first})") \
            from None
    model.eval()  # BatchNorm running statistics, no dropout
    return model, backbone, image_size
