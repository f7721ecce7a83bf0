"""What a run trains (``task``): each task says what its model and stages are and runs its loop.
The build (:mod:`transferlab.run.build`) and the record (:class:`~transferlab.tracking.
RunTracker`) are the same for every task.

- ``classify``: a backbone with a new head, trained stage by stage by the freeze policy; with
  ``head=logreg``, scikit-learn's LogisticRegression fitted on the frozen features instead.
- ``autoencoder``: the ``conv_encoder`` backbone and its mirrored decoder learn to reconstruct
  the training images (labels unused); a classifier restores the encoder later.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from transferlab.backbones.conv_encoder import Autoencoder
from transferlab.checkpoint import save_epoch_checkpoints
from transferlab.config import (
    AutoencoderTaskConfig,
    LogRegHeadConfig,
    RunConfig,
    SelectorSpec,
    StageSpec,
    TaskConfig,
)
from transferlab.data import make_loaders
from transferlab.loop import evaluate, recon_epoch, train_one_epoch
from transferlab.optim import stage_optimizer
from transferlab.policy import ParamGroup, StagePlan, apply_stage, plan_stages, set_train_mode
from transferlab.registry import TASKS
from transferlab.run.build import BuiltRun, build_classifier
from transferlab.schedule import StageSchedule
from transferlab.summary import stage_table
from transferlab.tracking import RunTracker

log = logging.getLogger("transferlab")


class Task:
    """The interface of a task (the defaults suit a network trained by stages)."""

    loss_tag = "loss"  # TensorBoard: <split>/<loss_tag>
    unused_groups: tuple[str, ...] = ()  # config groups left out of its HParams record

    def deterministic_inputs(self, run: RunConfig) -> bool:
        """Whether training images take the eval transform whatever ``augment`` says."""
        return False

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        raise NotImplementedError

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        raise NotImplementedError

    def curves_title(self, run: RunConfig) -> str | None:
        return run.name

    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        raise NotImplementedError

    def summary(self, metrics: dict, run_dir: Path) -> str:
        best, final = metrics["best"], metrics["final"]
        return (f"best val acc {best['val_acc']:.4f} (epoch {best['epoch']}), final val acc "
                f"{final['val_acc']:.4f}, {metrics['wall_seconds']:.1f}s")


def _checkpoint(built: BuiltRun, tracker: RunTracker, run_dir: Path, optimizer, epoch: int,
                plan: StagePlan, improved: bool) -> None:
    save_epoch_checkpoints(run_dir, improved, model=built.model, optimizer=optimizer,
                           epoch=epoch, stage_index=plan.index, stage_name=plan.name,
                           config=built.run.as_dict(), history=tracker.history, best=tracker.best,
                           classes=built.splits.classes if built.run.task.name == "classify"
                           else [])


class BeforeStep:
    """Runs before every optimizer step: the stage's schedule sets each group's LR, and every
    ``every`` steps the LRs go to TensorBoard (``lr/<group>``)."""

    def __init__(self, tracker: RunTracker, every: int):
        self.tracker, self.every = tracker, every
        self.schedule: StageSchedule | None = None
        self.step = 0

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        self.schedule.apply(optimizer)
        self.step += 1
        if self.step % self.every == 0:
            self.tracker.log_lrs(self.step, optimizer)


class Classify(Task):
    def deterministic_inputs(self, run: RunConfig) -> bool:
        return isinstance(run.head, LogRegHeadConfig)  # frozen features are not augmented

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        if isinstance(built.run.head, LogRegHeadConfig):
            return None
        return build_classifier(built.run, built.backbone, built.feature_shape,
                                built.splits.num_classes)

    def curves_title(self, run: RunConfig) -> str | None:
        return None if isinstance(run.head, LogRegHeadConfig) else run.name  # one "epoch"

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        return plan_stages(built.model, built.backbone, built.run.freeze, built.run.optimizer.lr)

    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        if built.model is None:
            return fit_logreg_head(built, tracker, run_dir)
        run, model, device = built.run, built.model, built.device
        channels_last = run.trainer.channels_last and len(built.feature_shape) == 3
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        log_training_samples(tracker, built.splits.train, built.backbone.input)
        train_loader, val_loader = make_loaders(built.splits, run.trainer, run.seed, device)
        weights = (built.splits.class_weights().to(device)
                   if run.trainer.class_weights == "balanced" else None)
        criterion = nn.CrossEntropyLoss(weight=weights,
                                        label_smoothing=run.trainer.label_smoothing)
        val_criterion = nn.CrossEntropyLoss()  # plain: val losses compare across runs
        before_step = BeforeStep(tracker, run.trainer.log_every_n_steps)
        optimizer, total_epochs = None, built.total_epochs
        for plan in built.plans:
            if plan.spec.epochs == 0:
                continue
            apply_stage(model, plan)
            optimizer = stage_optimizer(model, plan, run.optimizer, optimizer)
            before_step.schedule = StageSchedule(plan.spec.scheduler or run.scheduler,
                                                 plan.spec.epochs, len(train_loader))
            tracker.params = {"total": sum(p.numel() for p in model.parameters()),
                              "trainable": sum(p.numel() for p in model.parameters()
                                               if p.requires_grad)}
            table = stage_table(model, built.backbone, plan)
            log.info("\n%s", table)
            tracker.log_text(f"summary/{plan.name}", table, plan.first_epoch)
            for epoch in range(plan.first_epoch, plan.last_epoch + 1):
                set_train_mode(model, plan)
                tr = train_one_epoch(model, train_loader, criterion, optimizer, device,
                                     built.precision, channels_last=channels_last,
                                     progress=built.progress,
                                     desc=f"epoch {epoch}/{total_epochs} [{plan.name}]",
                                     before_step=before_step)
                va = evaluate(model, val_loader, val_criterion, device, built.precision,
                              channels_last=channels_last, progress=built.progress)
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
                _checkpoint(built, tracker, run_dir, optimizer, epoch, plan, improved)


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


def fit_logreg_head(built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
    """``head=logreg``: scikit-learn's LogisticRegression on the frozen backbone's features of
    the training images (eval preprocessing); recorded as one epoch (stage ``logreg``); the
    fitted pipeline is pickled to ``logreg.pkl``."""
    from transferlab.features import extract_splits, fit_logreg

    run, splits = built.run, built.splits
    arrays = extract_splits(built.backbone, splits, run.trainer, built.device)
    fit = fit_logreg(arrays, run.head.C, run.head.max_iter, run.seed)
    dim, k = arrays["train"][0].shape[1], len(splits.classes)
    tracker.params = {"total": dim * k + k, "trainable": dim * k + k}
    tracker.log_epoch({"epoch": 1, "stage": "logreg",
                       "train_loss": fit["train_loss"], "train_acc": fit["train_acc"],
                       "val_loss": fit["val_loss"], "val_acc": fit["val_acc"],
                       "lr": {}, "seconds": round(fit["seconds"], 3)}, 0)
    log.info("logistic regression on %d frozen %s features of %d images: train acc %.4f, val "
             "acc %.4f, val loss %.4f (fit in %.1fs)", dim, run.backbone.name, len(splits.train),
             fit["train_acc"], fit["val_acc"], fit["val_loss"], fit["seconds"])
    with (run_dir / "logreg.pkl").open("wb") as f:
        pickle.dump({"model": fit["model"], "classes": splits.classes}, f)


AUTOENCODER_STAGE = "autoencoder"


class Autoencode(Task):
    """Unsupervised pretraining (``task=autoencoder``).

    The loss is the mean squared error between the decoder's output and the input image as
    the loader gives it (normalised). Records follow classification runs without accuracy:
    ``train/recon_loss``, ``val/recon_loss``, ``recon/val`` (val images above their
    reconstructions); best / final are keyed on ``val_loss``. The checkpoints' model state dict
    holds ``encoder.*`` and ``decoder.*``.
    """

    loss_tag = "recon_loss"
    unused_groups = ("head", "freeze")

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        return Autoencoder(built.backbone.module)

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        names = [n for n, _ in built.model.named_parameters()]
        epochs = built.run.trainer.epochs
        spec = StageSpec(AUTOENCODER_STAGE, epochs, [SelectorSpec("all")], bn="train")
        return [StagePlan(0, spec, [ParamGroup("all", names, built.run.optimizer.lr)], 1)]

    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        run, model, device, plan = built.run, built.model, built.device, built.plans[0]
        task: AutoencoderTaskConfig = run.task
        model.to(device)
        train_loader, val_loader = make_loaders(built.splits, run.trainer, run.seed, device)
        optimizer = stage_optimizer(model, plan, run.optimizer, None)
        before_step = BeforeStep(tracker, run.trainer.log_every_n_steps)
        before_step.schedule = StageSchedule(run.scheduler, plan.spec.epochs, len(train_loader))
        n = sum(p.numel() for p in model.parameters())
        tracker.params = {"total": n, "trainable": n}
        shown = min(task.reconstructions, len(built.splits.val))
        samples = torch.stack([built.splits.val[i][0] for i in range(shown)]) if shown else None
        epochs = plan.spec.epochs
        for epoch in range(1, epochs + 1):
            train_loss, train_s = recon_epoch(model, train_loader, device, built.precision,
                                              optimizer, before_step, built.progress,
                                              f"epoch {epoch}/{epochs}")
            val_loss, val_s = recon_epoch(model, val_loader, device, built.precision,
                                          progress=built.progress, desc="val")
            record = {"epoch": epoch, "stage": AUTOENCODER_STAGE, "train_loss": train_loss,
                      "val_loss": val_loss,
                      "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                      "seconds": round(train_s + val_s, 3)}
            improved = tracker.log_epoch(record, 0)
            if samples is not None:
                grid = reconstruction_grid(model, samples, built.backbone.input.mean,
                                           built.backbone.input.std, device)
                tracker.log_images("recon/val", grid, epoch, nrow=shown)
            log.info("epoch %d/%d [%s] train recon loss %.4f | val recon loss %.4f | %.1fs%s",
                     epoch, epochs, AUTOENCODER_STAGE, train_loss, val_loss, record["seconds"],
                     "  *best" if improved else "")
            _checkpoint(built, tracker, run_dir, optimizer, epoch, plan, improved)

    def summary(self, metrics: dict, run_dir: Path) -> str:
        best = metrics["best"]
        return (f"best val recon loss {best['val_loss']:.4f} (epoch {best['epoch']}), final "
                f"{metrics['final']['val_loss']:.4f}, {metrics['wall_seconds']:.1f}s; restore "
                "the encoder in a classifier: experiment=ae_transfer backbone.init.path="
                f"{run_dir / 'checkpoints' / 'best.pt'}")


def reconstruction_grid(model: nn.Module, images: torch.Tensor, mean, std,
                        device: torch.device) -> torch.Tensor:
    """``images`` (normalised) above their reconstructions, un-normalised to [0, 1]."""
    model.eval()
    with torch.no_grad():
        recon = model(images.to(device)).float().cpu()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return torch.cat([images, recon]).mul(s).add(m).clamp(0, 1)


TASKS.register("classify", TaskConfig, Classify())
TASKS.register("autoencoder", AutoencoderTaskConfig, Autoencode())
