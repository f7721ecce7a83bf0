"""One run, end to end: config -> data + model -> stages -> epochs -> logs and artifacts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from transferlab.backbones import build_backbone, probe_features
from transferlab.checkpoint import save_epoch_checkpoints
from transferlab.config import RunConfig, load_config
from transferlab.data import build_splits, make_loaders
from transferlab.errors import error_line
from transferlab.heads import build_head
from transferlab.loop import evaluate, train_one_epoch
from transferlab.model import TransferModel
from transferlab.optim import stage_optimizer
from transferlab.policy import apply_stage, plan_stages, set_train_mode
from transferlab.restore_init import format_report, report_summary, restore_into
from transferlab.runtime import Precision, pick_device, seed_everything
from transferlab.schedule import StageSchedule
from transferlab.summary import stage_table
from transferlab.tracking import RunTracker

log = logging.getLogger("transferlab")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]

    @property
    def best_val_acc(self) -> float:
        return (self.metrics.get("best") or {}).get("val_acc", 0.0)


def run_hparams(run: RunConfig, overrides: list[str] | None, epochs: int) -> dict[str, Any]:
    """The HParams record: each config group's chosen option, the seed, every override."""
    hp: dict[str, Any] = {
        "backbone": run.backbone.name, "head": run.head.name, "dataset": run.dataset.name,
        "augment": run.augment.name, "freeze": run.freeze.name, "optimizer": run.optimizer.name,
        "scheduler": run.scheduler.name, "seed": run.seed, "optimizer.lr": run.optimizer.lr,
        "epochs": epochs, "backbone.pretrained": run.backbone.pretrained,
    }
    for item in overrides or []:
        key, _, value = item.lstrip("+~").partition("=")
        if key and ("." in key or key not in hp):  # group choices are recorded above
            hp[key] = _scalar(value)
    return hp


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def write_failed_metrics(run_dir: Path, exc: BaseException) -> None:
    """A ``metrics.json`` for a run that failed before training started."""
    data = {"status": "failed", "error": error_line(exc), "history": [], "best": None,
            "final": None, "params": {}, "wall_seconds": 0.0}
    (run_dir / "metrics.json").write_text(json.dumps(data, indent=2))


def log_training_samples(tracker: RunTracker, dataset, spec, n: int = 16) -> None:
    """A grid of training images as the model gets them (augmented), un-normalised, in
    TensorBoard (``data/train_samples``). Drawn on a forked RNG: training is unaffected."""
    if len(dataset) == 0:
        return
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    with torch.random.fork_rng():
        images = [dataset[i % len(dataset)][0] for i in range(min(n, 2 * len(dataset)))]
    grid = torch.stack([(x.float() * std + mean).clamp(0, 1) for x in images])
    tracker.log_images("data/train_samples", grid)


def train(cfg: DictConfig | RunConfig, run_dir: str | Path,
          overrides: list[str] | None = None) -> RunResult:
    """Train one composed config; write every artifact under ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = cfg if isinstance(cfg, RunConfig) else load_config(cfg)
    except Exception as exc:
        write_failed_metrics(run_dir, exc)
        raise
    if run.task.name == "autoencoder":  # unsupervised pretraining: a loop of its own
        from transferlab.pretrain import train_autoencoder

        return train_autoencoder(run, run_dir, overrides)
    seed_everything(run.seed, run.trainer.deterministic)
    if run.head.name == "logreg":  # a classical classifier on frozen features
        from transferlab.features import train_logreg

        return RunResult(run_dir, train_logreg(run, run_dir, run_hparams(run, overrides, 1)))
    try:
        device = pick_device(run.trainer.device)
        precision = Precision(device, run.trainer.amp)
        backbone = build_backbone(run.backbone)
        init_report = None
        if run.backbone.init.path:  # tensors of any checkpoint, after the pretrained weights
            init_report = restore_into(backbone.module, run.backbone.init)
            log.info("\n%s", format_report(init_report))
        image_size = run.dataset.image_size or backbone.input.size
        splits = build_splits(run.dataset, run.augment, backbone.input, image_size)
        feature_shape = probe_features(backbone, image_size)
        head = build_head(run.head, feature_shape, splits.num_classes)
        model = TransferModel(backbone.module, head)
        plans = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
        train_loader, val_loader = make_loaders(splits, run.trainer, run.seed, device)
    except Exception as exc:
        write_failed_metrics(run_dir, exc)
        raise
    log.info("run %s: %s on %s (%d train / %d val images, %d classes, %dpx) on %s, precision %s",
             run.name, backbone.name, run.dataset.name, len(splits.train), len(splits.val),
             splits.num_classes, image_size, device, precision.label)

    channels_last = run.trainer.channels_last and len(feature_shape) == 3
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    total_epochs = plans[-1].last_epoch
    tracker = RunTracker(run_dir, run.raw, run_hparams(run, overrides, total_epochs))
    log_training_samples(tracker, splits.train, backbone.input)
    if init_report is not None:
        tracker.log_text("init/restore", format_report(init_report))
        tracker.extra["init"] = report_summary(init_report)
    tracker.extra["data"] = {"train": len(splits.train), "val": len(splits.val),
                             "test": len(splits.test) if splits.test is not None else 0,
                             "classes": splits.classes, "train_per_class": splits.class_counts()}
    if splits.skipped:
        tracker.extra["skipped_files"] = splits.skipped
    progress = run.trainer.progress
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    weights = splits.class_weights().to(device) if run.trainer.class_weights == "balanced" \
        else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=run.trainer.label_smoothing)
    val_criterion = nn.CrossEntropyLoss()  # plain: val losses compare across runs
    optimizer, step = None, 0
    schedule: StageSchedule | None = None

    def before_step(opt: torch.optim.Optimizer) -> None:
        nonlocal step
        schedule.apply(opt)
        step += 1
        if step % run.trainer.log_every_n_steps == 0:
            tracker.log_lrs(step, opt)

    with tracker.recording(run.name):
        for plan in plans:
            if plan.spec.epochs == 0:
                continue
            apply_stage(model, plan)
            optimizer = stage_optimizer(model, plan, run.optimizer, optimizer)
            schedule = StageSchedule(plan.spec.scheduler or run.scheduler, plan.spec.epochs,
                                     len(train_loader))
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            tracker.params = {"total": total, "trainable": trainable}
            table = stage_table(model, backbone, plan)
            log.info("\n%s", table)
            tracker.log_text(f"summary/{plan.name}", table, plan.first_epoch)
            for epoch in range(plan.first_epoch, plan.last_epoch + 1):
                set_train_mode(model, plan)
                tr = train_one_epoch(model, train_loader, criterion, optimizer, device, precision,
                                     channels_last=channels_last, progress=progress,
                                     desc=f"epoch {epoch}/{total_epochs} [{plan.name}]",
                                     before_step=before_step)
                va = evaluate(model, val_loader, val_criterion, device, precision,
                              channels_last=channels_last, progress=progress)
                record = {
                    "epoch": epoch, "stage": plan.name,
                    "train_loss": tr.loss, "train_acc": tr.acc,
                    "val_loss": va.loss, "val_acc": va.acc,
                    "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                    "seconds": round(tr.seconds + va.seconds, 3),
                }
                improved = tracker.log_epoch(record, plan.index)
                log.info("epoch %d/%d [%s] train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
                         "%.1fs%s", epoch, total_epochs, plan.name, tr.loss, tr.acc, va.loss,
                         va.acc, record["seconds"], "  *best" if improved else "")
                ckpt = dict(model=model, optimizer=optimizer, epoch=epoch,
                            stage_index=plan.index, stage_name=plan.name, config=run.raw,
                            history=tracker.history, best=tracker.best, classes=splits.classes)
                save_epoch_checkpoints(run_dir, improved, **ckpt)
    metrics = tracker.metrics
    log.info("best val acc %.4f (epoch %d), final val acc %.4f, %.1fs",
             metrics["best"]["val_acc"], metrics["best"]["epoch"],
             metrics["final"]["val_acc"], metrics["wall_seconds"])
    return RunResult(run_dir, metrics)
