"""What a run trains (``task``): each task says what its model and stages are and runs its loop.
The build (:mod:`transferlab.run.build`) and the record (:class:`~transferlab.tracking.
RunTracker`) are the same for every task.

- ``classify``: a backbone with a new head, trained stage by stage by the freeze policy; with
  ``head=logreg``, scikit-learn's LogisticRegression fitted on the frozen features instead.
- ``autoencoder``: the ``conv_encoder`` backbone and its mirrored decoder learn to reconstruct
  the training images (labels unused); a classifier restores the encoder later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from transferlab.backbones.conv_encoder import Autoencoder
from transferlab.checkpoint import save_epoch_checkpoints
from transferlab.cluster import preemption_signal
from transferlab.config import (
    AutoencoderTaskConfig,
    LogRegHeadConfig,
    RunConfig,
    SelectorSpec,
    StageSpec,
    TaskConfig,
)
from transferlab.data import make_loaders
from transferlab.distributed import World
from transferlab.early_stopping import EarlyStopping
from transferlab.ema import WeightsEma, ema_columns, ema_fields
from transferlab.errors import UserError
from transferlab.feature_cache import StageInputs
from transferlab.loop import EpochStats, evaluate, recon_epoch, reduced, train_one_epoch
from transferlab.mixup import batch_mixer, mix_record, mixing, mixing_reason
from transferlab.optim import stage_optimizer
from transferlab.policy import ParamGroup, StagePlan, apply_stage, plan_stages, set_train_mode
from transferlab.registry import TASKS
from transferlab.regularize import L2SP
from transferlab.run.build import BuiltRun, build_classifier
from transferlab.runtime import rng_state, set_rng_state
from transferlab.schedule import StageSchedule
from transferlab.stepping import StepOptions
from transferlab.summary import stage_table
from transferlab.tracking import Interrupted, RunTracker

log = logging.getLogger("transferlab")


class Task:
    """A task: its model and stages (:mod:`transferlab.run.build` asks for them) and its loop.
    The loop (:meth:`fit`) is the same for every network task: stages in order, epochs, the
    record and the checkpoints, resume and clean stops; a task says how one epoch trains
    (:meth:`train_epoch`), evaluates (:meth:`eval_epoch`) and what its record holds."""

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

    def summary(self, metrics: dict, run_dir: Path) -> str:
        best, final, ema = metrics["best"], metrics["final"], metrics.get("best_ema")
        return (f"best val acc {best['val_acc']:.4f} (epoch {best['epoch']}), final val acc "
                f"{final['val_acc']:.4f}" + (f", EMA weights' best {ema['val_acc_ema']:.4f} "
                                             f"(epoch {ema['epoch']})" if ema else "")
                + f", {metrics['wall_seconds']:.1f}s")

    # -- the epoch, as a task trains it ----------------------------------------------------
    def start(self, built: BuiltRun, tracker: RunTracker) -> None:
        """Before the first epoch (a resumed run too)."""

    def stage_inputs(self, built: BuiltRun, plan: StagePlan, tracker: RunTracker,
                     train_loader, val_loader) -> StageInputs:
        """What the stage trains on (the model has the stage's requires_grad and modes): the
        image loaders and the whole model, unless a task caches part of it."""
        return StageInputs(train_loader, val_loader, built.model)

    def train_epoch(self, built: BuiltRun, model: nn.Module, loader, optimizer,
                    **kwargs) -> EpochStats:
        raise NotImplementedError

    def eval_epoch(self, built: BuiltRun, model: nn.Module, loader) -> EpochStats:
        raise NotImplementedError

    def record(self, epoch: int, plan: StagePlan, tr: EpochStats, va: EpochStats) -> dict:
        return {"epoch": epoch, "stage": plan.name, "train_loss": tr.loss, "train_acc": tr.acc,
                **({"train_penalty": tr.penalty} if tr.penalty is not None else {}),
                "val_loss": va.loss, "val_acc": va.acc}

    def eval_ema(self, built: BuiltRun, inputs: StageInputs) -> EpochStats | None:
        """The EMA of the weights on the stage's val inputs, through the stage's model (None
        without one), over every process's share of them."""
        if built.ema is None:
            return None
        with built.ema.swapped_in():
            return reduced(self.eval_epoch(built, inputs.model, inputs.val), built.world)

    def after_epoch(self, built: BuiltRun, tracker: RunTracker, epoch: int) -> None:
        """After an epoch is recorded (e.g. images of it in TensorBoard)."""

    def log_line(self, record: dict, total_epochs: int, improved: bool) -> str:
        penalty = (f" penalty {record['train_penalty']:.4g}" if "train_penalty" in record
                   else "")
        return (f"epoch {record['epoch']}/{total_epochs} [{record['stage']}] train loss "
                f"{record['train_loss']:.4f} acc {record['train_acc']:.4f}{penalty} | val loss "
                f"{record['val_loss']:.4f} acc {record['val_acc']:.4f}{ema_columns(record)} | "
                f"{record['seconds']:.1f}s{'  *best' if improved else ''}")

    # -- the loop --------------------------------------------------------------------------
    def fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
        """Every stage's epochs, from the start or from ``built.resume``; stops cleanly (a
        checkpoint, then :class:`Interrupted`) on SIGINT / SIGTERM.

        Under DDP (``built.world``) every process runs this same loop on its share of each
        batch: the module a stage trains is wrapped in DDP at the stage's start (so that DDP
        sees exactly its trainable parameters) and released at its end; the metrics are
        summed over the processes, so each takes the same decisions; rank 0 writes."""
        with StopRequest().installed() as stop:  # before the loader processes fork
            self._fit(built, tracker, run_dir, stop)

    def _fit(self, built: BuiltRun, tracker: RunTracker, run_dir: Path,
             stop: StopRequest) -> None:
        run, model, device, resume = built.run, built.model, built.device, built.resume
        world = built.world
        if resume is not None:
            model.load_state_dict(resume.model)
        model.to(device)
        if built.channels_last:
            model.to(memory_format=torch.channels_last)
        built.ema = WeightsEma.of(run.trainer.ema, model, resume.ema if resume else None)
        train_loader, val_loader = make_loaders(built.splits, run.trainer, run.seed, device,
                                                batch_mixer(run.augment, len(built.splits.classes),
                                                            run.seed), world)
        if train_loader.persistent_workers:  # its one base seed is drawn now, as on a resume
            iter(train_loader)
        self.start(built, tracker)
        before_step = BeforeStep(tracker, run.trainer.log_every_n_steps)
        stepping = StepOptions.from_trainer(run.trainer, before_step.log_grad_norm)
        stopping = EarlyStopping(run.trainer.early_stopping, tracker,
                                 resume.epoch if resume is not None else None)
        optimizer, total_epochs = None, built.total_epochs
        partial = None
        asked = stop.agreed(world)  # DDP: every process stops at the same step
        if resume is not None:
            before_step.step = resume.step
            partial = resume.partial
            set_rng_state(resume.rng_of(world.rank))
        plans = [p for p in built.plans if p.spec.epochs > 0]
        for plan, next_plan in zip(plans, [*plans[1:], None], strict=True):
            if resume is not None and plan.index < resume.stage_index:
                continue
            apply_stage(model, plan)
            set_train_mode(model, plan)
            if built.ema is not None:
                built.ema.start_stage()
            inputs = self.stage_inputs(built, plan, tracker, train_loader, val_loader)
            trained = world.wrap(inputs.model, device)  # DDP: exactly the stage's parameters
            resuming = resume is not None and plan.index == resume.stage_index
            optimizer = stage_optimizer(model, plan, run.optimizer,
                                        None if resuming else optimizer)
            schedule = StageSchedule(plan.spec.scheduler or run.scheduler, plan.spec.epochs,
                                     stepping.steps_per_epoch(len(inputs.train)))
            first = plan.first_epoch
            stopping.begin(plan, resume.early_stopping if resuming else None,
                           resume.model if resuming and partial is None else None)
            if resuming:
                optimizer.load_state_dict(resume.optimizer)
                schedule.step = resume.schedule_step
                first = partial["epoch"] if partial else resume.epoch + 1
            before_step.schedule = schedule
            tracker.params = {"total": sum(p.numel() for p in model.parameters()),
                              "trainable": sum(p.numel() for p in model.parameters()
                                               if p.requires_grad)}
            if first == plan.first_epoch and partial is None:
                table = stage_table(model, built.backbone, plan)
                table += stopping.describe()
                log.info("\n%s", table)
                tracker.log_text(f"summary/{plan.name}", table, plan.first_epoch)
            for epoch in range(first, plan.last_epoch + 1) if not stopping.stopped else ():
                set_train_mode(model, plan)
                done = None
                if partial is not None:  # the rest of an epoch stopped part-way
                    train_loader.sampler.skip_batches = partial["steps"]
                    sums = tuple(partial["sums"]) if world.main else (0.0, 0, 0)  # all ranks'
                    done = EpochStats(0.0, 0.0, 0, partial["seconds"], partial["steps"],
                                      sums=sums)
                    partial = None
                train_loader.sampler.set_epoch(epoch)  # the epoch's order: (seed, epoch)
                try:
                    tr = self.train_epoch(built, trained, inputs.train, optimizer,
                                          before_step=before_step, should_stop=asked,
                                          resume=done, stepping=stepping,
                                          after_step=built.ema.update if built.ema else None,
                                          desc=f"epoch {epoch}/{total_epochs} [{plan.name}]")
                except FloatingPointError as exc:  # "loss is nan at step S"
                    raise UserError(f"{exc}".replace(" at step", f" at epoch {epoch} step")
                                    + ": the run diverged; lower optimizer.lr") from None
                train_loader.sampler.skip_batches = 0
                world.average_batchnorm_stats(model)
                state = dict(step=before_step.step, schedule_step=schedule.step)
                if tr.stopped and tr.steps < len(inputs.train):
                    _checkpoint(built, tracker, run_dir, optimizer, epoch - 1, plan,
                                False, dict(state, partial={
                                    "epoch": epoch, "steps": tr.steps,
                                    "sums": list(reduced(tr, world).sums),
                                    "seconds": tr.seconds}, **stopping.state(partial=True)))
                    raise Interrupted(stop.signum)
                tr = reduced(tr, world)
                va = reduced(self.eval_epoch(built, inputs.model, inputs.val), world)
                ve = self.eval_ema(built, inputs)
                record = self.record(epoch, plan, tr, va)
                record = {**record, **ema_fields(ve, record),
                          "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                          "seconds": round(tr.seconds + va.seconds + (ve.seconds if ve else 0), 3)}
                stopped = stopping.update(record, built.model)
                improved = tracker.log_epoch(record, plan.index)
                self.after_epoch(built, tracker, epoch)
                log.info(self.log_line(record, total_epochs, improved))
                _checkpoint(built, tracker, run_dir, optimizer, epoch, plan, improved,
                            dict(state, **stopping.state()))
                if asked():
                    raise Interrupted(stop.signum)
                if stopped:
                    break
            world.release(trained)
            stopping.end(built.model, next_plan)
            world.check_same_weights(built.model, f"after stage '{plan.name}'")


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step (it then writes a
    checkpoint and raises :class:`Interrupted`); a second Ctrl-C stops at once. Calling it
    says whether a stop was asked for. In a submitit job, its preemption signal too
    (:mod:`transferlab.cluster`): it is the one :class:`Interrupted` carries when both came
    (SLURM may send SIGTERM first), so that the job is requeued."""

    def __init__(self):
        self.signum: int | None = None
        self.owner = os.getpid()
        self.preemption = preemption_signal()

    def __call__(self) -> bool:
        return self.signum is not None

    def agreed(self, world: World) -> Callable[[], bool]:
        """Asking it says whether any process of the run was asked to stop (then all take
        that signal): DDP processes must stop after the same step. Itself for one process."""
        if not world.active:
            return self

        def ask() -> bool:
            signum = world.max_int(self.signum or 0)
            if signum and self.signum is None:
                self.signum = signum
            return bool(signum)

        return ask

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.owner:  # a loader process forked with this handler: the
            return                      # main process stops it when it stops
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None or self.signum != self.preemption:
            self.signum = signum
        log.warning("%s: finishing the current step, then saving a checkpoint to resume "
                    "from (Ctrl-C again to stop at once)", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers belong to the main thread (e.g. a joblib worker's)
            return
        signals = (signal.SIGINT, signal.SIGTERM, *([self.preemption] if self.preemption else []))
        previous = {s: signal.getsignal(s) for s in signals}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _checkpoint(built: BuiltRun, tracker: RunTracker, run_dir: Path, optimizer, epoch: int,
                plan: StagePlan, improved: bool, loop: dict) -> None:
    """``last.pt`` (and ``best.pt``): ``epoch`` is the last completed one. Under DDP every
    process calls it (their RNG states go into the checkpoint); rank 0 writes it."""
    world = built.world
    rngs = world.gather(rng_state())
    if not world.main:
        return
    loop = {**loop, "data": built.data_fingerprint()}
    if world.active:
        loop.update(world_size=world.size, rng_ranks=rngs[1:])
    if built.penalty is not None:
        loop["l2sp_w0"] = built.penalty.fingerprint()
    ema_best = "partial" not in loop and (tracker.extra.get("best_ema") or {}).get("epoch") == epoch
    save_epoch_checkpoints(run_dir, improved, keep_every=built.run.trainer.keep_checkpoints ==
                           "all" and "partial" not in loop, improved_ema=ema_best,
                           ema=built.ema.state() if built.ema is not None else None,
                           model=built.model, optimizer=optimizer, epoch=epoch,
                           stage_index=plan.index, stage_name=plan.name,
                           config=built.run.as_dict(), history=tracker.history,
                           best=tracker.best, classes=built.splits.classes
                           if built.run.task.name == "classify" else [], loop=loop)


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

    def log_grad_norm(self, norm: torch.Tensor) -> None:
        """The total grad norm before clipping (``grad/norm``), as often as the LRs."""
        if self.step % self.every == 0:
            self.tracker.writer.add_scalar("grad/norm", float(norm), self.step)


def train_criterion(built: BuiltRun) -> nn.Module:
    """A classifier's training loss: cross-entropy with the run's label smoothing and class
    weights (the training loop's and the LR finder's)."""
    trainer = built.run.trainer
    weights = (built.splits.class_weights().to(built.device)
               if trainer.class_weights == "balanced" else None)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=trainer.label_smoothing)


class Classify(Task):
    def deterministic_inputs(self, run: RunConfig) -> bool:
        return isinstance(run.head, LogRegHeadConfig)  # frozen features are not augmented

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

    def start(self, built: BuiltRun, tracker: RunTracker) -> None:
        run = built.run
        if built.resume is None:
            if tracker.writes:
                log_training_samples(tracker, built.splits, built.backbone.input)
        elif built.penalty is not None:
            built.penalty.check_resume(built.resume.l2sp_w0)
        self.criterion = train_criterion(built)
        self.val_criterion = nn.CrossEntropyLoss()  # plain: val losses compare across runs
        if mixing(run.augment):  # soft targets (MixUp / CutMix)
            tracker.extra["mix"] = mix_record(run.augment)

    def stage_inputs(self, built: BuiltRun, plan: StagePlan, tracker: RunTracker,
                     train_loader, val_loader) -> StageInputs:
        run = built.run
        random_inputs = mixing_reason(run.augment) or (
            None if run.augment.name == "none" or self.deterministic_inputs(run)
            else f"augment={run.augment.name} makes the training images random")
        cached = built.feature_cache.stage_inputs(
            plan.name, built.model, built.backbone, built.image_size, built.splits,
            train_loader, val_loader, random_inputs)
        tracker.extra["feature_cache"] = {**tracker.extra.get("feature_cache", {}),
                                          **built.feature_cache.report}
        return cached or super().stage_inputs(built, plan, tracker, train_loader, val_loader)

    def train_epoch(self, built: BuiltRun, model: nn.Module, loader, optimizer,
                    **kwargs) -> EpochStats:
        return train_one_epoch(model, loader, self.criterion, optimizer, built.device,
                               built.precision, channels_last=built.channels_last,
                               progress=built.progress, penalty=built.penalty, **kwargs)

    def eval_epoch(self, built: BuiltRun, model: nn.Module, loader) -> EpochStats:
        return evaluate(model, loader, self.val_criterion, built.device, built.precision,
                        channels_last=built.channels_last, progress=built.progress)


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


def fit_logreg_head(built: BuiltRun, tracker: RunTracker, run_dir: Path) -> None:
    """``head=logreg``: scikit-learn's LogisticRegression on the frozen backbone's features of
    the training images (eval preprocessing); recorded as one epoch (stage ``logreg``); the
    fitted pipeline is pickled to ``logreg.pkl``."""
    from transferlab.features import extract_splits, fit_logreg

    run, splits = built.run, built.splits
    arrays = extract_splits(built.backbone, splits, run.trainer, built.device,
                            built.image_size, built.feature_cache, "logreg")
    tracker.extra["feature_cache"] = built.feature_cache.report
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
    if built.world.main:
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

    def start(self, built: BuiltRun, tracker: RunTracker) -> None:
        task: AutoencoderTaskConfig = built.run.task
        self.shown = min(task.reconstructions, len(built.splits.val))
        self.samples = (torch.stack([built.splits.val[i][0] for i in range(self.shown)])
                        if self.shown else None)

    def train_epoch(self, built: BuiltRun, model: nn.Module, loader, optimizer,
                    **kwargs) -> EpochStats:
        return recon_epoch(model, loader, built.device, built.precision, optimizer,
                           progress=built.progress, **kwargs)

    def eval_epoch(self, built: BuiltRun, model: nn.Module, loader) -> EpochStats:
        return recon_epoch(model, loader, built.device, built.precision,
                           progress=built.progress, desc="val")

    def record(self, epoch: int, plan: StagePlan, tr: EpochStats, va: EpochStats) -> dict:
        return {"epoch": epoch, "stage": plan.name, "train_loss": tr.loss, "val_loss": va.loss}

    def after_epoch(self, built: BuiltRun, tracker: RunTracker, epoch: int) -> None:
        if self.samples is not None and tracker.writes:
            grid = reconstruction_grid(built.model, self.samples, built.backbone.input.mean,
                                       built.backbone.input.std, built.device)
            tracker.log_images("recon/val", grid, epoch, nrow=self.shown)

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
