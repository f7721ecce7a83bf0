"""What a run trains (``task``): each task's registry entry says what its model and stages are,
what it minimises, what its config may and may not hold, how a resume extends it, and runs its
loop. The build (:mod:`transferlab.run.build`) and the record (:class:`~transferlab.run.record.
RunTracker`) are the same for every task.

- ``classify``: a backbone with a new head, trained stage by stage by the freeze policy.
- ``logreg``: scikit-learn's LogisticRegression fitted on the frozen backbone's features
  (:mod:`transferlab.run.logreg`): a classical baseline, in closed form.
- ``autoencoder``: the ``conv_encoder`` backbone and its mirrored decoder learn to reconstruct
  the training images (labels unused); a classifier restores the encoder later.

A config is checked against its task's rules (:meth:`Task.check`, :meth:`Task.unused`) before
anything is built, torch included: this module imports none of what trains at its top; each
method that trains imports what it needs where it needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.config.schema import (
    AutoencoderTaskConfig,
    ConvEncoderConfig,
    LogRegTaskConfig,
    RunConfig,
    SelectorSpec,
    StageSpec,
)
from transferlab.config.validate import at_least, check_value
from transferlab.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from transferlab.engine.epoch import EpochStats, Objective
    from transferlab.engine.hooks import Hook
    from transferlab.run.build import BuiltRun
    from transferlab.run.record import RunTracker
    from transferlab.staging.policy import StagePlan


class Task:
    """A task: its model and stages (:mod:`transferlab.run.build` asks for them), what it
    minimises (:meth:`objectives`), its config rules, its record and its own hooks. Every
    network task trains on the one staged engine (:func:`~transferlab.engine.stages.
    fit_stages`); a task holds no state of a run (one instance serves every run)."""

    loss_tag = "loss"  # TensorBoard: <split>/<loss_tag>
    unused_groups: tuple[str, ...] = ()  # config groups left out of its HParams record
    has_classes = True  # its checkpoints hold the class names (a classifier's)
    not_resumable: str | None = None  # why its runs have nothing to resume (None: they do)

    # --- its config: checked before anything is built -----------------------------------------

    def check(self, run: RunConfig) -> None:
        """The cross-field checks this task owns (one-line errors, before anything is built)."""

    def unused(self, run: RunConfig) -> list[tuple[str, tuple[str, ...]]]:
        """(what the run is, the groups and keys it does not use): overriding one of them is an
        error, as an unknown key is."""
        return []

    def stages_from_freeze(self, run: RunConfig) -> bool:
        """Whether its stages are the freeze policy's (which then sets their epochs)."""
        return True

    def deterministic_inputs(self, run: RunConfig) -> bool:
        """Whether training images take the eval transform whatever ``augment`` says."""
        return False

    def policy_label(self, run: RunConfig) -> str:
        """How messages name the source of its stages (``freeze=two_stage``)."""
        return f"freeze={run.freeze.name}"

    # --- a saved run's config (resume) ----------------------------------------------------------

    def extend(self, raw: dict, key: str, epochs: int) -> None:
        """A resume's ``key=epochs`` (``trainer.epochs`` / ``freeze.finetune_epochs``) applied
        to the saved config ``raw``: its last stage gets ``epochs`` epochs. Each freeze
        policy's registry entry knows its key (:class:`~transferlab.staging.policy.Policy`)."""
        from transferlab.staging.policy import policy_entry

        policy_entry(raw["freeze"].get("name")).extend(raw, key, epochs)

    def extend_key(self, raw: dict) -> str | None:
        """The key that gives the saved config ``raw``'s last stage more epochs."""
        from transferlab.staging.policy import policy_entry

        return policy_entry(raw["freeze"].get("name")).extends

    def planned_epochs(self, raw: dict) -> int | None:
        """The epochs the saved config ``raw`` plans (None: known once built, e.g. gradual)."""
        stages = raw["freeze"]["stages"]
        return sum(s["epochs"] for s in stages) if stages else None

    # --- its build and loop ---------------------------------------------------------------------

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        raise NotImplementedError

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        raise NotImplementedError

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

    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        """Every stage's epochs, from the start or from ``built.resume``; stops cleanly (a
        checkpoint, then :class:`~transferlab.errors.Interrupted`) on SIGINT / SIGTERM.

        Under DDP (``built.world``) every process runs this same loop on its share of each
        batch (the :class:`~transferlab.engine.hooks.Distributed` hook); the metrics are
        summed over the processes, so each takes the same decisions; rank 0 writes."""
        from transferlab.engine.stages import fit_stages
        from transferlab.infra.runtime import set_rng_state
        from transferlab.run.build import stage_loop
        from transferlab.run.hooks import StopRequest, run_hooks

        with StopRequest().installed() as stop:  # before the loader processes fork
            loop = stage_loop(built, run_hooks(built, tracker, run_dir, stop))
            self.start(built, tracker)
            if built.resume is not None:
                set_rng_state(built.resume.rng_of(built.world.rank))
            try:
                fit_stages(loop)
            except Exception:
                if stop():  # failed after a stop was asked for: the sweep stops all the same
                    StopRequest.late = stop.signum
                raise
            if stop():  # (after the last epoch's look: the run is complete, the sweep stops)
                StopRequest.late = stop.signum

    # --- its record -----------------------------------------------------------------------------

    def record(self, epoch: int, plan: StagePlan, tr: EpochStats, va: EpochStats) -> dict:
        """An epoch's record from its train and val stats (loss and accuracy)."""
        from transferlab.engine.stages import plain_record

        return plain_record(epoch, plan, tr, va)

    def curves_title(self, run: RunConfig) -> str | None:
        """The learning curves' title (None: no curves, e.g. a run of one fit)."""
        return run.name

    def log_line(self, record: dict, total_epochs: int, improved: bool) -> str:
        from transferlab.engine.ema import ema_columns

        penalty = (f" penalty {record['train_penalty']:.4g}" if "train_penalty" in record
                   else "")
        return (f"epoch {record['epoch']}/{total_epochs} [{record['stage']}] train loss "
                f"{record['train_loss']:.4f} acc {record['train_acc']:.4f}{penalty} | val loss "
                f"{record['val_loss']:.4f} acc {record['val_acc']:.4f}{ema_columns(record)} | "
                f"{record['seconds']:.1f}s{'  *best' if improved else ''}")

    def summary(self, metrics: dict, run_dir: Path) -> str:
        best, final, ema = metrics["best"], metrics["final"], metrics.get("best_ema")
        return (f"best val acc {best['val_acc']:.4f} (epoch {best['epoch']}), final val acc "
                f"{final['val_acc']:.4f}" + (f", EMA weights' best {ema['val_acc_ema']:.4f} "
                                             f"(epoch {ema['epoch']})" if ema else "")
                + f", {metrics['wall_seconds']:.1f}s")


class Classify(Task):
    """A backbone with a new head, trained stage by stage by the freeze policy."""

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        from transferlab.run.build import build_classifier
        from transferlab.staging.regularize import L2SP

        model = build_classifier(built.run, built.backbone, built.feature_shape,
                                 built.splits.num_classes)
        built.penalty = L2SP.of(built.run.trainer.regularize, model)  # w0: the weights now
        return model

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        from transferlab.staging.policy import plan_stages

        return plan_stages(built.model, built.backbone, built.run.freeze, built.run.optimizer.lr)

    def objectives(self, built: BuiltRun) -> tuple[Objective, Objective]:
        from transferlab.engine.epoch import CrossEntropy
        from transferlab.run.build import train_criterion

        # validation: plain cross-entropy, so that val losses compare across runs
        return CrossEntropy(train_criterion(built)), CrossEntropy()

    def start(self, built: BuiltRun, tracker: RunTracker) -> None:
        from transferlab.data.mixup import mix_record, mixing
        from transferlab.run.images import log_training_samples

        run = built.run
        if built.resume is None:
            if tracker.writes:
                log_training_samples(tracker, built.splits, built.backbone.input)
        elif built.penalty is not None:
            built.penalty.check_resume(built.resume.l2sp_w0)
        if mixing(run.augment):  # soft targets (MixUp / CutMix)
            tracker.extra["mix"] = mix_record(run.augment)

    def hooks(self, built: BuiltRun, tracker: RunTracker) -> list[Hook]:
        from transferlab.run.extra_test import ExtraTests
        from transferlab.run.hooks import RecordPredictions
        from transferlab.run.wise import WiseStart

        extra = ExtraTests(built, tracker)
        return [RecordPredictions(built, tracker, also=(extra.score,) if extra.sets else ()),
                WiseStart(built, tracker.run_dir)]

    def input_hooks(self, built: BuiltRun, recorder) -> list[Hook]:
        from transferlab.data.mixup import mixing_reason
        from transferlab.run.hooks import CachedInputs

        run = built.run
        random_inputs = mixing_reason(run.augment) or (
            None if run.augment.name == "none"
            else f"augment={run.augment.name} makes the training images random")
        return [CachedInputs(built, recorder, random_inputs)]


class LogReg(Task):
    """``task=logreg``: scikit-learn's LogisticRegression on the frozen backbone's pooled
    features of the training images (eval preprocessing), fitted in closed form instead of
    the staged loop; recorded as one epoch, the fitted pipeline pickled to ``logreg.pkl``."""

    IS = "task=logreg fits a logistic regression on frozen features"
    unused_groups = ("head", "freeze", "optimizer", "scheduler", "augment")
    not_resumable = ("a task=logreg run fits its logistic regression in one pass (logreg.pkl), "
                     "with no epochs to go on with or checkpoint to go on from: to fit it "
                     "again, start a new run")

    def check(self, run: RunConfig) -> None:
        task: LogRegTaskConfig = run.task
        check_value("task.C", task.C, task.C > 0, "> 0")
        at_least("task.max_iter", task.max_iter, 1)
        name = run.trainer.regularize.name
        if name != "none":
            raise UserError(f"trainer.regularize.name={name}: {self.IS}; use "
                            "trainer.regularize.name=none")

    def unused(self, run: RunConfig) -> list[tuple[str, tuple[str, ...]]]:
        return [(self.IS, (
            *self.unused_groups, "trainer.epochs", "trainer.label_smoothing",
            "trainer.class_weights", "trainer.sampler", "trainer.log_every_n_steps", "trainer.amp",
            "trainer.ema", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
            "trainer.gradient_clip_algorithm", "trainer.early_stopping", "trainer.regularize",
            "dataset.extra_test"))]

    def stages_from_freeze(self, run: RunConfig) -> bool:
        return False

    def deterministic_inputs(self, run: RunConfig) -> bool:
        return True  # frozen features are not augmented

    def policy_label(self, run: RunConfig) -> str:
        return f"task={run.task.name}"

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        return None  # no network: no stages, no checkpoints

    def curves_title(self, run: RunConfig) -> str | None:
        return None  # one "epoch"

    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        from transferlab.run.logreg import fit_logreg_head

        fit_logreg_head(built, tracker, run_dir)


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

    def check(self, run: RunConfig) -> None:
        at_least("task.reconstructions", run.task.reconstructions, 0)
        if not isinstance(run.backbone, ConvEncoderConfig):
            raise UserError(f"task=autoencoder trains the conv_encoder backbone, not "
                            f"{run.backbone.name} ({run.backbone.source}): add "
                            "backbone=conv_encoder dataset.image_size=32 (or use "
                            "experiment=ae_pretrain)")
        at_least("trainer.epochs", run.trainer.epochs, 1)
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
                  "trainer.feature_cache", "trainer.regularize", "dataset.extra_test"))]

    def stages_from_freeze(self, run: RunConfig) -> bool:
        return False

    def policy_label(self, run: RunConfig) -> str:
        return f"task={run.task.name}"

    def extend_key(self, raw: dict) -> str | None:
        return "trainer.epochs"

    def extend(self, raw: dict, key: str, epochs: int) -> None:
        if key != "trainer.epochs":
            raise UserError(f"{key} does not extend an autoencoder run: its one stage runs "
                            "trainer.epochs; give trainer.epochs=N")
        raw["trainer"]["epochs"] = epochs

    def planned_epochs(self, raw: dict) -> int | None:
        return raw["trainer"]["epochs"]

    def build_model(self, built: BuiltRun) -> nn.Module | None:
        from transferlab.backbones.conv_encoder import Autoencoder

        return Autoencoder(built.backbone.module)

    def plan_stages(self, built: BuiltRun) -> list[StagePlan]:
        from transferlab.staging.policy import ParamGroup, StagePlan

        names = [n for n, _ in built.model.named_parameters()]
        epochs = built.run.trainer.epochs
        spec = StageSpec(AUTOENCODER_STAGE, epochs, [SelectorSpec("all")], bn="train")
        return [StagePlan(0, spec, [ParamGroup("all", names, built.run.optimizer.lr)], 1)]

    def objectives(self, built: BuiltRun) -> tuple[Objective, Objective]:
        from transferlab.engine.epoch import Reconstruction

        return Reconstruction(), Reconstruction()

    def hooks(self, built: BuiltRun, tracker: RunTracker) -> list[Hook]:
        from transferlab.run.hooks import ReconstructionImages

        task: AutoencoderTaskConfig = built.run.task
        return [ReconstructionImages(built, tracker, task.reconstructions)]

    def record(self, epoch: int, plan: StagePlan, tr: EpochStats, va: EpochStats) -> dict:
        return {"epoch": epoch, "stage": plan.name, "train_loss": tr.loss, "val_loss": va.loss}

    def log_line(self, record: dict, total_epochs: int, improved: bool) -> str:
        from transferlab.engine.ema import ema_columns

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


# the entries of task=classify, task=logreg and task=autoencoder (transferlab.registry)
CLASSIFY = Classify()
LOGREG = LogReg()
AUTOENCODE = Autoencode()
