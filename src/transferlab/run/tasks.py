"""What a run trains (``task``): each task says what its model and stages are and runs its loop.
The build (:mod:`transferlab.run.build`) and the record (:class:`~transferlab.run.record.
RunTracker`) are the same for every task.

- ``classify``: a backbone with a new head, trained stage by stage by the freeze policy; with
  ``head=logreg``, scikit-learn's LogisticRegression fitted on the frozen features instead.
- ``autoencoder``: the ``conv_encoder`` backbone and its mirrored decoder learn to reconstruct
  the training images (labels unused); a classifier restores the encoder later.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from transferlab.backbones.conv_encoder import Autoencoder
from transferlab.config import (
    AutoencoderTaskConfig,
    ConvEncoderConfig,
    LogRegHeadConfig,
    RunConfig,
    SelectorSpec,
    StageSpec,
)
from transferlab.config.validate import at_least
from transferlab.data import make_loaders
from transferlab.data.mixup import batch_mixer, mix_record, mixing, mixing_reason
from transferlab.engine.ema import ema_columns
from transferlab.engine.epoch import CrossEntropy, EpochStats, Objective, Reconstruction
from transferlab.engine.hooks import Hook
from transferlab.engine.stages import Loop, fit_stages, plain_record
from transferlab.engine.stepping import StepOptions
from transferlab.errors import UserError
from transferlab.infra.runtime import set_rng_state
from transferlab.run.build import BuiltRun, build_classifier
from transferlab.run.hooks import CachedInputs, StopRequest, run_hooks
from transferlab.run.logreg import fit_logreg_head
from transferlab.run.record import RunTracker
from transferlab.staging.policy import ParamGroup, StagePlan, plan_stages, policy_entry
from transferlab.staging.regularize import L2SP

log = logging.getLogger("transferlab")


class Task:
    """A task: its model and stages (:mod:`transferlab.run.build` asks for them), what it
    minimises (:meth:`objectives`), its record and its own hooks. Every network task trains
    on the one staged engine (:func:`~transferlab.engine.stages.fit_stages`); a task holds
    no state of a run (one instance serves every run)."""

    loss_tag = "loss"  # TensorBoard: <split>/<loss_tag>
    unused_groups: tuple[str, ...] = ()  # config groups left out of its HParams record
    has_classes = True  # its checkpoints hold the class names (a classifier's)
    record = staticmethod(plain_record)  # an epoch's record from its train and val stats

    def deterministic_inputs(self, run: RunConfig) -> bool:
        """Whether training images take the eval transform whatever ``augment`` says."""
        return False

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        raise NotImplementedError

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        raise NotImplementedError

    def policy_label(self, run: RunConfig) -> str:
        """How messages name the source of its stages (``freeze=two_stage``)."""
        return f"freeze={run.freeze.name}"

    def extend(self, raw: dict, key: str, epochs: int) -> None:
        """A resume's ``key=epochs`` (``trainer.epochs`` / ``freeze.finetune_epochs``) applied
        to the saved config ``raw``: its last stage gets ``epochs`` epochs. Each freeze
        policy's registry entry knows its key (:class:`~transferlab.staging.policy.Policy`)."""
        policy_entry(raw["freeze"].get("name")).extend(raw, key, epochs)

    def extend_key(self, raw: dict) -> str | None:
        """The key that gives the saved config ``raw``'s last stage more epochs."""
        return policy_entry(raw["freeze"].get("name")).extends

    def planned_epochs(self, raw: dict) -> int | None:
        """The epochs the saved config ``raw`` plans (None: known once built, e.g. gradual)."""
        stages = raw["freeze"]["stages"]
        return sum(s["epochs"] for s in stages) if stages else None

    def check(self, run: RunConfig) -> None:
        """The cross-field checks this task owns (one-line errors, before anything is built)."""

    def unused(self, run: RunConfig) -> list[tuple[str, tuple[str, ...]]]:
        """(what the run is, the groups and keys it does not use): overriding one of them is an
        error, as an unknown key is."""
        return []

    def stages_from_freeze(self, run: RunConfig) -> bool:
        """Whether its stages are the freeze policy's (which then sets their epochs)."""
        return True

    def curves_title(self, run: RunConfig) -> str | None:
        return run.name

    def summary(self, metrics: dict, run_dir: Path) -> str:
        best, final, ema = metrics["best"], metrics["final"], metrics.get("best_ema")
        return (f"best val acc {best['val_acc']:.4f} (epoch {best['epoch']}), final val acc "
                f"{final['val_acc']:.4f}" + (f", EMA weights' best {ema['val_acc_ema']:.4f} "
                                             f"(epoch {ema['epoch']})" if ema else "")
                + f", {metrics['wall_seconds']:.1f}s")

    def objectives(self, built: BuiltRun) -> tuple[Objective, Objective]:
        """(what training minimises, what validation reports)."""
        raise NotImplementedError

    def input_hooks(self, built: BuiltRun, recorder) -> list[Hook]:
        """Hooks that give a stage other inputs than the image loaders (the feature cache)."""
        return []

    def hooks(self, built: BuiltRun, tracker: RunTracker) -> list[Hook]:
        """The task's own hooks (after the record's, before the checkpoint's)."""
        return []

    def start(self, built: BuiltRun, tracker: RunTracker) -> None:
        """Before the first epoch (a resumed run too)."""

    def log_line(self, record: dict, total_epochs: int, improved: bool) -> str:
        penalty = (f" penalty {record['train_penalty']:.4g}" if "train_penalty" in record
                   else "")
        return (f"epoch {record['epoch']}/{total_epochs} [{record['stage']}] train loss "
                f"{record['train_loss']:.4f} acc {record['train_acc']:.4f}{penalty} | val loss "
                f"{record['val_loss']:.4f} acc {record['val_acc']:.4f}{ema_columns(record)} | "
                f"{record['seconds']:.1f}s{'  *best' if improved else ''}")

    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        """Every stage's epochs, from the start or from ``built.resume``; stops cleanly (a
        checkpoint, then :class:`Interrupted`) on SIGINT / SIGTERM.

        Under DDP (``built.world``) every process runs this same loop on its share of each
        batch (the :class:`~transferlab.engine.hooks.Distributed` hook); the metrics are
        summed over the processes, so each takes the same decisions; rank 0 writes."""
        with StopRequest().installed() as stop:  # before the loader processes fork
            loop = stage_loop(built, run_hooks(built, tracker, run_dir, stop))
            self.start(built, tracker)
            if built.resume is not None:
                set_rng_state(built.resume.rng_of(built.world.rank))
            fit_stages(loop)


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


class Classify(Task):
    """A backbone with a new head, trained stage by stage by the freeze policy; with
    ``head=logreg``, scikit-learn's LogisticRegression fitted on the frozen features."""

    LOGREG = "head=logreg fits a logistic regression on frozen features"

    def deterministic_inputs(self, run: RunConfig) -> bool:
        return isinstance(run.head, LogRegHeadConfig)  # frozen features are not augmented

    def check(self, run: RunConfig) -> None:
        name = run.trainer.regularize.name
        if isinstance(run.head, LogRegHeadConfig) and name != "none":
            raise UserError(f"trainer.regularize.name={name}: {self.LOGREG}; use "
                            "trainer.regularize.name=none")

    def unused(self, run: RunConfig) -> list[tuple[str, tuple[str, ...]]]:
        if not isinstance(run.head, LogRegHeadConfig):
            return []
        return [(self.LOGREG, (
            "freeze", "optimizer", "scheduler", "augment", "trainer.epochs",
            "trainer.label_smoothing", "trainer.class_weights", "trainer.sampler",
            "trainer.log_every_n_steps", "trainer.amp", "trainer.ema",
            "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
            "trainer.gradient_clip_algorithm", "trainer.early_stopping", "trainer.regularize"))]

    def stages_from_freeze(self, run: RunConfig) -> bool:
        return not isinstance(run.head, LogRegHeadConfig)

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        if isinstance(built.run.head, LogRegHeadConfig):
            return None
        model = build_classifier(built.run, built.backbone, built.feature_shape,
                                 built.splits.num_classes)
        built.penalty = L2SP.of(built.run.trainer.regularize, model)  # w0: the weights now
        return model

    def curves_title(self, run: RunConfig) -> str | None:
        return None if isinstance(run.head, LogRegHeadConfig) else run.name  # one "epoch"

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        return plan_stages(built.model, built.backbone, built.run.freeze, built.run.optimizer.lr)

    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        if built.model is None:
            return fit_logreg_head(built, tracker, run_dir)
        return super().fit(built, tracker, run_dir)

    def objectives(self, built: BuiltRun) -> tuple[Objective, Objective]:
        # validation: plain cross-entropy, so that val losses compare across runs
        return CrossEntropy(train_criterion(built)), CrossEntropy()

    def start(self, built: BuiltRun, tracker: RunTracker) -> None:
        run = built.run
        if built.resume is None:
            if tracker.writes:
                log_training_samples(tracker, built.splits, built.backbone.input)
        elif built.penalty is not None:
            built.penalty.check_resume(built.resume.l2sp_w0)
        if mixing(run.augment):  # soft targets (MixUp / CutMix)
            tracker.extra["mix"] = mix_record(run.augment)

    def input_hooks(self, built: BuiltRun, recorder) -> list[Hook]:
        run = built.run
        random_inputs = mixing_reason(run.augment) or (
            None if run.augment.name == "none" or self.deterministic_inputs(run)
            else f"augment={run.augment.name} makes the training images random")
        return [CachedInputs(built, recorder, random_inputs)]


def log_training_samples(tracker: RunTracker, splits, spec, n: int = 16) -> None:
    """A grid of training images as the model gets them (augmented), un-normalised, drawn
    from every class in turn and labelled with its class name, in TensorBoard
    (``data/train_samples``). Drawn on a forked RNG: training is unaffected."""
    dataset, labels = splits.train, splits.train_labels
    if len(dataset) == 0:
        return
    picks = sample_indices(labels or [0] * len(dataset), n)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    with torch.random.fork_rng():
        images = [(dataset[i][0].float() * std + mean).clamp(0, 1) for i in picks]
    names = [splits.classes[labels[i]] if labels else "" for i in picks]
    tracker.log_images("data/train_samples", torch.stack(
        [_labelled(x, name) for x, name in zip(images, names, strict=True)]))


def sample_indices(labels: list[int], n: int) -> list[int]:
    """Up to ``n`` indices taking each class in turn (the first image of every class, then
    the second, ...)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    queues = [by_class[y] for y in sorted(by_class)]
    picks: list[int] = []
    depth = 0
    while len(picks) < n and any(depth < len(q) for q in queues):
        picks += [q[depth] for q in queues if depth < len(q)][:n - len(picks)]
        depth += 1
    return picks


def _labelled(image: torch.Tensor, text: str) -> torch.Tensor:
    """``image`` (3, H, W in [0, 1]) with ``text`` written in its top-left corner."""
    if not text:
        return image
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    pil: Image.Image = to_pil_image(image)
    draw = ImageDraw.Draw(pil)
    box = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return pil_to_tensor(pil).float() / 255.0


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
    has_classes = False
    not_a_classifier = ("this is an autoencoder run (task=autoencoder): it has no classifier; "
                        "restore its encoder into one with experiment=ae_transfer "
                        "backbone.init.path=<its checkpoints/best.pt>")

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        return Autoencoder(built.backbone.module)

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        names = [n for n, _ in built.model.named_parameters()]
        epochs = built.run.trainer.epochs
        spec = StageSpec(AUTOENCODER_STAGE, epochs, [SelectorSpec("all")], bn="train")
        return [StagePlan(0, spec, [ParamGroup("all", names, built.run.optimizer.lr)], 1)]

    def objectives(self, built: BuiltRun) -> tuple[Objective, Objective]:
        return Reconstruction(), Reconstruction()

    def check(self, run: RunConfig) -> None:
        at_least("task.reconstructions", run.task.reconstructions, 0)
        if not isinstance(run.backbone, ConvEncoderConfig):
            raise UserError(f"task=autoencoder trains the conv_encoder backbone, not "
                            f"{run.backbone.name} ({run.backbone.source}): add "
                            "backbone=conv_encoder dataset.image_size=32 (or use "
                            "experiment=ae_pretrain)")
        at_least("trainer.epochs", run.trainer.epochs, 1)
        if isinstance(run.head, LogRegHeadConfig):
            raise UserError(f"head=logreg is a classifier: it does not go with "
                            f"task={run.task.name}")
        if run.augment.mixup_alpha > 0 or run.augment.cutmix_alpha > 0:
            raise UserError("augment.mixup_alpha / augment.cutmix_alpha mix labels: "
                            "task=autoencoder has none; set them to 0")
        stopping = run.trainer.early_stopping
        if stopping.patience is not None and stopping.monitor == "val_acc":
            raise UserError("trainer.early_stopping.monitor=val_acc: task=autoencoder has no "
                            "accuracy; monitor val_loss (its reconstruction loss)")
        if run.trainer.regularize.name != "none":
            raise UserError(f"trainer.regularize.name={run.trainer.regularize.name}: "
                            "task=autoencoder trains an encoder and its decoder from scratch; "
                            "use trainer.regularize.name=none")

    def unused(self, run: RunConfig) -> list[tuple[str, tuple[str, ...]]]:
        return [("task=autoencoder trains an encoder and its decoder without labels",
                 ("head", "freeze", "trainer.label_smoothing", "trainer.class_weights",
                  "trainer.feature_cache", "trainer.regularize"))]

    def stages_from_freeze(self, run: RunConfig) -> bool:
        return False

    @staticmethod
    def record(epoch: int, plan: StagePlan, tr: EpochStats, va: EpochStats) -> dict:
        return {"epoch": epoch, "stage": plan.name, "train_loss": tr.loss, "val_loss": va.loss}

    def extend_key(self, raw: dict) -> str | None:
        return "trainer.epochs"

    def extend(self, raw: dict, key: str, epochs: int) -> None:
        if key != "trainer.epochs":
            raise UserError(f"{key} does not extend an autoencoder run: its one stage runs "
                            "trainer.epochs; give trainer.epochs=N")
        raw["trainer"]["epochs"] = epochs

    def planned_epochs(self, raw: dict) -> int | None:
        return raw["trainer"]["epochs"]

    def policy_label(self, run: RunConfig) -> str:
        return f"task={run.task.name}"

    def hooks(self, built: BuiltRun, tracker: RunTracker) -> list[Hook]:
        task: AutoencoderTaskConfig = built.run.task
        return [ReconstructionImages(built, tracker, task.reconstructions)]

    def log_line(self, record: dict, total_epochs: int, improved: bool) -> str:
        return (f"epoch {record['epoch']}/{total_epochs} [{record['stage']}] train recon loss "
                f"{record['train_loss']:.4f} | val recon loss {record['val_loss']:.4f}"
                f"{ema_columns(record)} | "
                f"{record['seconds']:.1f}s{'  *best' if improved else ''}")

    def summary(self, metrics: dict, run_dir: Path) -> str:
        best = metrics["best"]
        return (f"best val recon loss {best['val_loss']:.4f} (epoch {best['epoch']}), final "
                f"{metrics['final']['val_loss']:.4f}, {metrics['wall_seconds']:.1f}s; restore "
                "the encoder in a classifier: experiment=ae_transfer backbone.init.path="
                f"{run_dir / 'checkpoints' / 'best.pt'}")


class ReconstructionImages(Hook):
    """After every epoch, the first ``shown`` val images above their reconstructions
    (``recon/val`` in TensorBoard)."""

    def __init__(self, built: BuiltRun, tracker: RunTracker, shown: int):
        self.built, self.tracker = built, tracker
        self.shown = min(shown, len(built.splits.val))
        self.samples = (torch.stack([built.splits.val[i][0] for i in range(self.shown)])
                        if self.shown and tracker.writes else None)

    def on_epoch_end(self, loop) -> None:
        if self.samples is not None:
            spec = self.built.backbone.input
            grid = reconstruction_grid(loop.model, self.samples, spec.mean, spec.std,
                                       loop.ctx.device)
            self.tracker.log_images("recon/val", grid, loop.epoch, nrow=self.shown)


def reconstruction_grid(model: nn.Module, images: torch.Tensor, mean, std,
                        device: torch.device) -> torch.Tensor:
    """``images`` (normalised) above their reconstructions, un-normalised to [0, 1]."""
    model.eval()
    with torch.no_grad():
        recon = model(images.to(device)).float().cpu()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return torch.cat([images, recon]).mul(s).add(m).clamp(0, 1)


# the entries of task=classify and task=autoencoder (transferlab.registry.load_builtins)
CLASSIFY = Classify()
AUTOENCODE = Autoencode()
