"""Unsupervised pretraining (``task=autoencoder``): a convolutional autoencoder learns to
reconstruct the training images (labels unused); a classifier restores its encoder later.

The encoder is the run's backbone (``backbone=conv_encoder``), the decoder mirrors it
(:class:`~transferlab.backbones.conv_encoder.ConvDecoder`). The loss is the mean squared error
between the decoder's output and the input image as the loader gives it (normalised: the
decoder's output is linear, in the same normalised pixel space).

Artifacts follow classification runs: ``metrics.json`` (history entries with ``epoch``,
``stage: autoencoder``, ``train_loss``, ``val_loss``, ``lr``, ``seconds``; best / final keyed on
``val_loss``, no accuracy), TensorBoard (``train/recon_loss``, ``val/recon_loss``, ``recon/val``:
val images above their reconstructions), ``learning_curves.png`` and ``checkpoints/last.pt`` +
``best.pt``, whose model state dict holds ``encoder.conv1.weight``, ..., ``encoder.fc.*`` and
``decoder.*``: ``backbone.init.strip_prefix: "encoder."`` restores the encoder by name.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from transferlab.backbones import build_backbone, probe_features
from transferlab.backbones.conv_encoder import ConvDecoder, ConvEncoder
from transferlab.checkpoint import save_epoch_checkpoints
from transferlab.config import RunConfig, SelectorSpec, StageSpec
from transferlab.data import build_splits, make_loaders
from transferlab.errors import UserError
from transferlab.optim import stage_optimizer
from transferlab.policy import ParamGroup, StagePlan
from transferlab.restore_init import format_report, report_summary, restore_into
from transferlab.runner import RunResult, run_hparams, write_failed_metrics
from transferlab.runtime import Precision, pick_device, seed_everything
from transferlab.schedule import StageSchedule
from transferlab.tracking import RunTracker

log = logging.getLogger("transferlab")

STAGE = "autoencoder"


class Autoencoder(nn.Module):
    """``decoder(encoder(x))``; parameter names start with ``encoder.`` or ``decoder.``."""

    def __init__(self, encoder: ConvEncoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = ConvDecoder(encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def recon_epoch(model: nn.Module, loader: DataLoader, device: torch.device,
                precision: Precision, optimizer: torch.optim.Optimizer | None = None,
                schedule: StageSchedule | None = None, progress: bool = False,
                desc: str = "") -> tuple[float, float]:
    """(mean reconstruction loss per image, seconds) of one pass: a training pass when an
    ``optimizer`` is given, else an evaluation (no gradients). Labels are ignored."""
    start, total, count = time.perf_counter(), 0.0, 0
    model.train(optimizer is not None)
    with torch.set_grad_enabled(optimizer is not None):
        for x, _ in tqdm(loader, desc=desc, leave=False, disable=not progress,
                         dynamic_ncols=True):
            x = x.to(device, non_blocking=device.type == "cuda")
            with precision.autocast():
                out = model(x)
            loss = F.mse_loss(out.float(), x.float())
            if optimizer is not None:
                if schedule is not None:
                    schedule.apply(optimizer)
                optimizer.zero_grad(set_to_none=True)
                precision.scaler.scale(loss).backward()
                precision.scaler.step(optimizer)
                precision.scaler.update()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
    return total / max(count, 1), time.perf_counter() - start


def reconstruction_grid(model: nn.Module, images: torch.Tensor, mean, std,
                        device: torch.device) -> torch.Tensor:
    """``images`` (normalised) above their reconstructions, un-normalised to [0, 1]."""
    model.eval()
    with torch.no_grad():
        recon = model(images.to(device)).float().cpu()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return torch.cat([images, recon]).mul(s).add(m).clamp(0, 1)


def _setup_error(run: RunConfig) -> UserError | None:
    if run.backbone.source != "transferlab":
        return UserError(f"task=autoencoder trains the conv_encoder backbone, not "
                         f"{run.backbone.name} ({run.backbone.source}): add backbone=conv_encoder "
                         "dataset.image_size=32 (or use experiment=ae_pretrain)")
    if run.trainer.epochs < 1:
        return UserError(f"trainer.epochs must be >= 1 for task=autoencoder, got "
                         f"{run.trainer.epochs}")
    return None


def train_autoencoder(run: RunConfig, run_dir: str | Path,
                      overrides: list[str] | None = None) -> RunResult:
    """Pretrain the run's conv_encoder as an autoencoder; write every artifact under
    ``run_dir``. ``run.freeze`` and ``run.head`` play no part (everything trains)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = run.trainer.epochs
    try:
        if (error := _setup_error(run)) is not None:
            raise error
        seed_everything(run.seed, run.trainer.deterministic)
        device = pick_device(run.trainer.device)
        precision = Precision(device, run.trainer.amp)
        backbone = build_backbone(run.backbone)
        init_report = None
        if run.backbone.init.path:  # e.g. go on from an earlier autoencoder's encoder
            init_report = restore_into(backbone.module, run.backbone.init)
            log.info("\n%s", format_report(init_report))
        image_size = run.dataset.image_size or backbone.input.size
        splits = build_splits(run.dataset, run.augment, backbone.input, image_size)
        probe_features(backbone, image_size)
        model = Autoencoder(backbone.module).to(device)
        train_loader, val_loader = make_loaders(splits, run.trainer, run.seed, device)
        names = [n for n, _ in model.named_parameters()]
        plan = StagePlan(0, StageSpec(STAGE, epochs, [SelectorSpec("all")], bn="train"),
                         [ParamGroup("all", names, run.optimizer.lr)], 1)
        optimizer = stage_optimizer(model, plan, run.optimizer, None)
        schedule = StageSchedule(run.scheduler, epochs, len(train_loader))
    except Exception as exc:
        write_failed_metrics(run_dir, exc)
        raise
    log.info("run %s: %s autoencoder on %s (%d train / %d val images, labels unused, %dpx) on "
             "%s, precision %s", run.name, backbone.name, run.dataset.name, len(splits.train),
             len(splits.val), image_size, device, precision.label)

    hparams = {k: v for k, v in run_hparams(run, overrides, epochs).items()
               if k not in ("head", "freeze")}
    tracker = RunTracker(run_dir, run.raw, {"task": STAGE, **hparams}, loss_tag="recon_loss")
    tracker.params = {"total": sum(p.numel() for p in model.parameters()),
                      "trainable": sum(p.numel() for p in model.parameters())}
    tracker.extra["data"] = {"train": len(splits.train), "val": len(splits.val)}
    if init_report is not None:
        tracker.log_text("init/restore", format_report(init_report))
        tracker.extra["init"] = report_summary(init_report)
    shown = min(run.task.reconstructions, len(splits.val))
    samples = torch.stack([splits.val[i][0] for i in range(shown)]) if shown else None
    progress = run.trainer.progress
    if progress is None:
        import sys

        progress = sys.stderr.isatty()

    with tracker.recording(run.name):
        for epoch in range(1, epochs + 1):
            train_loss, train_s = recon_epoch(model, train_loader, device, precision, optimizer,
                                              schedule, progress, f"epoch {epoch}/{epochs}")
            val_loss, val_s = recon_epoch(model, val_loader, device, precision,
                                          progress=progress, desc="val")
            record = {"epoch": epoch, "stage": STAGE, "train_loss": train_loss,
                      "val_loss": val_loss,
                      "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                      "seconds": round(train_s + val_s, 3)}
            improved = tracker.log_epoch(record, 0)
            if samples is not None:
                grid = reconstruction_grid(model, samples, backbone.input.mean,
                                           backbone.input.std, device)
                tracker.log_images("recon/val", grid, epoch, nrow=shown)
            log.info("epoch %d/%d [%s] train recon loss %.4f | val recon loss %.4f | %.1fs%s",
                     epoch, epochs, STAGE, train_loss, val_loss, record["seconds"],
                     "  *best" if improved else "")
            ckpt = dict(model=model, optimizer=optimizer, epoch=epoch, stage_index=0,
                        stage_name=STAGE, config=run.raw, history=tracker.history,
                        best=tracker.best, classes=[])
            save_epoch_checkpoints(run_dir, improved, **ckpt)
    metrics = tracker.metrics
    best = metrics["best"]
    log.info("best val recon loss %.4f (epoch %d), final %.4f, %.1fs; restore the encoder in a "
             "classifier: experiment=ae_transfer backbone.init.path=%s", best["val_loss"],
             best["epoch"], metrics["final"]["val_loss"], metrics["wall_seconds"],
             run_dir / "checkpoints" / "best.pt")
    return RunResult(run_dir, metrics)
