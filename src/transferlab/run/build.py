"""The one build step of every run: config -> device, backbone (+ restored weights), data,
model, stages. Tasks (:mod:`transferlab.run.tasks`) say what their model and stages are; they
differ only in their loop."""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferlab.backbones import Backbone, build_backbone, probe_features
from transferlab.backbones.init import LoadReport, format_report, restore_into
from transferlab.backbones.source import record_source, weights_source
from transferlab.config import AugmentConfig, CheckpointWeights, LoraConfig, RunConfig
from transferlab.data import (
    DataSplits,
    build_splits,
    eval_batch_size,
    loader_workers,
    make_loaders,
)
from transferlab.data.mixup import batch_mixer
from transferlab.engine.context import EpochContext
from transferlab.engine.hooks import Hook
from transferlab.engine.stages import Loop
from transferlab.engine.stepping import StepOptions
from transferlab.errors import UserError
from transferlab.feature_cache import FeatureCache
from transferlab.heads import build_head
from transferlab.infra.distributed import World, pick_device_for
from transferlab.infra.runtime import Precision, pick_device
from transferlab.lora import add_adapters
from transferlab.model import TransferModel
from transferlab.registry import TASKS
from transferlab.staging.policy import StagePlan, training_batchnorms

if TYPE_CHECKING:
    from transferlab.infra.delta import WeightsSource
    from transferlab.run.resume import ResumePoint
    from transferlab.staging.regularize import L2SP

log = logging.getLogger("transferlab")


@dataclass
class BuiltRun:
    """Everything a task's loop works with."""

    run: RunConfig
    task: Any  # its registry entry (a transferlab.run.tasks.Task): model, stages, loop
    device: torch.device
    precision: Precision
    backbone: Backbone
    image_size: int
    feature_shape: tuple[int, ...]
    splits: DataSplits
    model: nn.Module | None  # None for a classical head (fitted on extracted features)
    plans: list[StagePlan] = field(default_factory=list)
    init_report: LoadReport | None = None
    resume: ResumePoint | None = None  # where a resumed run goes on
    penalty: L2SP | None = None  # trainer.regularize, set by the task with the model
    world: World = field(default_factory=World)  # this process of the run's (DDP: several)
    data: dict = field(default_factory=dict)  # the data's fingerprint when it was built
    # The pretrained tensors its checkpoints leave out where unchanged (None: they hold all)
    source: WeightsSource | None = None

    @property
    def channels_last(self) -> bool:
        """Channels-last memory format: asked for, and the features are a map."""
        return self.run.trainer.channels_last and len(self.feature_shape) == 3

    def data_fingerprint(self) -> dict:
        """What a resume checks has not changed on disk (taken when the run's data was built:
        :func:`data_fingerprint`)."""
        return self.data

    @functools.cached_property
    def feature_cache(self) -> FeatureCache:
        """The run's frozen-prefix feature cache (``trainer.feature_cache``)."""
        trainer = self.run.trainer
        return FeatureCache(trainer.feature_cache, self.device, self.precision,
                            self.channels_last, eval_batch_size(trainer), loader_workers(trainer),
                            self.world)

    @property
    def context(self) -> EpochContext:
        """Where and how its passes run (device, precision, channels-last, progress, world)."""
        return EpochContext(self.device, self.precision, self.channels_last, self.progress,
                            self.world, self.progress_every)

    @property
    def total_epochs(self) -> int:
        return self.plans[-1].last_epoch if self.plans else 1

    @property
    def progress(self) -> bool:
        """A progress bar: ``trainer.progress``, or when stderr is a terminal (rank 0's only)."""
        shown = self.run.trainer.progress
        return self.world.main and (sys.stderr.isatty() if shown is None else shown)

    @property
    def progress_every(self) -> float:
        """Seconds between progress lines: ``trainer.progress_seconds`` off a terminal
        (``trainer.progress`` unset, rank 0), else none (a bar, or ``progress=false``)."""
        trainer = self.run.trainer
        quiet = trainer.progress is False or self.progress or not self.world.main
        return 0.0 if quiet else float(trainer.progress_seconds)


def data_fingerprint(splits: DataSplits) -> dict:
    """Split sizes, classes and each split's identity (a hash of its images and labels,
    :func:`~transferlab.feature_cache.identity.dataset_identity`; None for a dataset type it
    does not know): what a resume checks has not changed on disk."""
    from transferlab.feature_cache.identity import dataset_identity

    named = {"train": splits.train, "val": splits.val, "test": splits.test}
    return {**{k: len(d) if d is not None else 0 for k, d in named.items()},
            "classes": list(splits.classes),
            "identity": {k: dataset_identity(d) for k, d in named.items() if d is not None}}


def build_classifier(run: RunConfig, backbone: Backbone, feature_shape: tuple[int, ...],
                     num_classes: int) -> TransferModel:
    """The backbone with the run's new head (the model of a classify run and of a saved one);
    with ``freeze=lora``, the backbone holds the policy's LoRA adapters."""
    model = TransferModel(backbone.module, build_head(run.head, feature_shape, num_classes))
    if isinstance(run.freeze, LoraConfig):
        model.adapters = add_adapters(model, backbone, run.freeze)
    return model


def build_backbone_of(run: RunConfig, source: bool = False
                      ) -> tuple[Backbone, LoadReport | None, int, tuple[int, ...]]:
    """(backbone with ``backbone.init`` restored, its report, image size, feature shape).
    The size is checked against the architecture before any image is read. ``source``: for
    the run's checkpoints (``trainer.checkpoint_weights=changed``), the weights as built are
    fingerprinted first (:func:`~transferlab.backbones.source.record_source`)."""
    backbone = build_backbone(run.backbone)
    log.info("backbone %s: weights from %s", backbone.name, backbone.weights)
    if source and run.trainer.checkpoint_weights == CheckpointWeights.changed:
        record_source(backbone, run.backbone)
    report = None
    if run.backbone.init.path:  # tensors of any checkpoint, after the pretrained weights
        report = restore_into(backbone.module, run.backbone.init)
        log.info("\n%s", format_report(report))
    image_size = run.dataset.image_size or backbone.input.size
    return backbone, report, image_size, probe_features(backbone, image_size)


def build_run(run: RunConfig, world: World | None = None) -> BuiltRun:
    """Build the run's parts in order: device, backbone, data, the task's model and stages.
    ``world``: this process of a DDP run (its GPU, SyncBatchNorm, the LR scaling)."""
    world = world or World()
    task = TASKS.builder(run.task.name)
    device = pick_device_for(pick_device(run.trainer.device), run.trainer.device, world)
    precision = Precision(device, run.trainer.amp)
    backbone, report, image_size, feature_shape = build_backbone_of(run, source=True)
    augment = AugmentConfig() if task.deterministic_inputs(run) else run.augment
    splits = build_splits(run.dataset, augment, backbone.input, image_size)
    built = BuiltRun(run=run, task=task, device=device, precision=precision, backbone=backbone,
                     image_size=image_size, feature_shape=feature_shape, splits=splits,
                     model=None, init_report=report, world=world,
                     data=data_fingerprint(splits))
    built.model = task.build_model(built)
    if built.model is not None:
        built.source = weights_source(built.model, backbone)
        built.plans = task.plan_stages(built)
        if world.active:
            distribute(built)
    return built


def distribute(built: BuiltRun) -> None:
    """A DDP run's model and stages: BatchNorm layers become SyncBatchNorm
    (``trainer.distributed.sync_bn``; the BatchNorm of a stage that trains it then needs CUDA),
    and every stage's LRs are multiplied by the number of processes
    (``trainer.distributed.scale_lr``)."""
    cfg, world = built.run.trainer.distributed, built.world
    if cfg.sync_bn:
        built.model = nn.SyncBatchNorm.convert_sync_batchnorm(built.model)
        if built.device.type != "cuda":
            for plan in built.plans:
                trains = training_batchnorms(built.model, plan)
                if trains:
                    raise UserError(
                        f"trainer.distributed.sync_bn=true: stage '{plan.name}' trains BatchNorm "
                        f"({trains[0]}{' ...' if len(trains) > 1 else ''}) on {built.device}, and "
                        "SyncBatchNorm trains on CUDA only: use sync_bn=false, or keep "
                        "BatchNorm in eval mode (the stage's bn: frozen / eval)")
    scale = world.lr_scale(built.run.trainer)
    if scale != 1:
        for plan in built.plans:
            for group in plan.groups:
                group.lr *= scale


def stage_loop(built: BuiltRun, hooks: list[Hook]) -> Loop:
    """The engine's loop for a built run: its model on its device (with a resume's weights),
    its loaders (MixUp / CutMix where ``augment`` mixes), objectives, stepping, penalty and
    ``hooks``: what training and the LR finder's warm-up both run."""
    run, model = built.run, built.model
    if built.resume is not None:
        model.load_state_dict(built.resume.model)
    model.to(built.device)
    if built.channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, val_loader = make_loaders(built.splits, run.trainer, run.seed, built.device,
                                            batch_mixer(run.augment, len(built.splits.classes),
                                                        run.seed), built.world)
    if train_loader.persistent_workers:  # its one base seed is drawn now, as on a resume
        iter(train_loader)
    train, val = built.task.objectives(built)
    return Loop(model=model, plans=built.plans, ctx=built.context, train_loader=train_loader,
                val_loader=val_loader, optimizer_cfg=run.optimizer, scheduler_cfg=run.scheduler,
                train_objective=train, eval_objective=val, hooks=hooks,
                stepping=StepOptions.from_trainer(run.trainer), record_fn=built.task.record,
                penalty=built.penalty, resume=built.resume)


def train_criterion(built: BuiltRun) -> nn.Module:
    """A classifier's training loss: cross-entropy with the run's label smoothing and class
    weights (the training loop's and the LR finder's)."""
    trainer = built.run.trainer
    weights = (built.splits.class_weights().to(built.device)
               if trainer.class_weights == "balanced" else None)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=trainer.label_smoothing)
