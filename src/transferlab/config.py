"""Typed run configuration: a thin, explicit mapping from the Hydra config to dataclasses.

Hydra composes ``conf/`` into one DictConfig; :func:`load_config` turns it into a
:class:`RunConfig`. Each config group has one dataclass here; an unknown key is a one-line
error naming the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transferlab.errors import UserError, did_you_mean


@dataclass
class InitConfig:
    """Weights restored into the backbone from a checkpoint file once it is built: any subset
    of the file's tensors, renamed onto the backbone's parameter names (``backbone.init.*``)."""

    path: str | None = None  # a transferlab checkpoint, a plain state_dict, a Lightning .ckpt
    include: list[str] = field(default_factory=lambda: ["*"])  # globs over the file's names
    exclude: list[str] = field(default_factory=list)
    strip_prefix: str = ""  # removed from the file's names (e.g. "encoder.")
    add_prefix: str = ""  # then prepended
    rename: dict[str, str] = field(default_factory=dict)  # explicit file name -> backbone name
    strict: bool = False  # true: shape mismatches and unmatched backbone tensors are errors


@dataclass
class BackboneConfig:
    name: str
    source: str  # torchvision | timm | efficientnet_lite0_package | transferlab
    pretrained: bool = True
    weights: str = "DEFAULT"  # torchvision weight enum member (e.g. IMAGENET1K_V1) or DEFAULT
    weights_path: str | None = None  # a local file of the pretrained weights (no download)
    init: InitConfig = field(default_factory=InitConfig)
    # The architecture of source "transferlab" (conv_encoder); other sources take none of these.
    channels: list[int] | None = None  # one stride-2 conv layer per entry (default [32, 64])
    latent_dim: int | None = None  # the fully connected latent, the features (default 64)
    image_size: int | None = None  # the only input size its fc layer takes (default 32)


@dataclass
class HeadConfig:
    name: str  # linear | mlp | flatten_dense | logreg
    dropout: float = 0.0
    C: float = 1.0  # logreg: inverse regularisation strength
    max_iter: int = 1000  # logreg: solver iterations


@dataclass
class DatasetConfig:
    name: str
    kind: str  # digits | image_folder | csv | torchvision | fake
    root: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0  # held out as a test split where the data has none of its own
    # csv: a table of image file names (x_col, relative to root) and labels (y_col)
    csv_file: str | None = None
    x_col: str = "id"
    y_col: str = "label"
    # torchvision: one of transferlab.data.torchvision_sets.SETS, downloaded to root
    download: bool = True
    # fake: torchvision's FakeData (random images), for smoke tests
    size: int = 200
    num_classes: int = 4
    split_seed: int = 0
    train_fraction: float = 1.0  # keep this fraction of every class of the training split
    samples_per_class: int | None = None  # or at most this many training images per class
    subset_seed: int = 0  # draws the training subset (the presets tie it to the run's seed)
    image_size: int | None = None  # None: the backbone's native input size
    crop_pct: float | None = None  # None: the backbone's (resize to size/crop_pct, centre crop)


@dataclass
class AugmentConfig:
    name: str  # none | flip | crop_flip | standard | randaugment | trivialaugment
    scale_min: float = 0.08  # crop_flip: RandomResizedCrop's smallest area fraction
    hflip: float = 0.5  # probability of a horizontal flip
    rotation: float = 20.0  # standard: degrees
    shift: float = 0.2  # standard: fraction of width / height
    shear: float = 0.2  # standard: degrees (as Keras' shear_range)
    zoom: float = 0.2  # standard: scale in [1 - zoom, 1 + zoom]
    num_ops: int = 2  # randaugment: operations per image
    magnitude: int = 9  # randaugment: strength, 0..30


@dataclass
class SelectorSpec:
    """One entry of a stage's ``train`` list (a plain string is ``select`` alone)."""

    select: str
    lr: float | None = None  # absolute learning rate
    lr_mult: float = 1.0  # multiplier of optimizer.lr (ignored when lr is set)


@dataclass
class SchedulerSpec:
    """A learning-rate schedule over one stage's steps (multiplies every group's LR)."""

    name: str = "constant"  # constant | cosine | step | onecycle
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr
    min_lr_mult: float = 0.0  # cosine: the LR it decays to, as a fraction of the LR
    step_epochs: int = 1  # step: multiply by gamma every step_epochs epochs
    gamma: float = 0.1
    pct_start: float = 0.3  # onecycle: fraction of the stage spent rising
    div_factor: float = 25.0  # onecycle: starts at lr / div_factor
    final_div_factor: float = 1.0e4  # onecycle: ends at lr / (div_factor * final_div_factor)


@dataclass
class StageSpec:
    name: str
    epochs: int
    train: list[SelectorSpec]
    # BatchNorm: frozen = layers in frozen parts in eval mode (statistics untouched), the rest
    # train; train = every layer updates its statistics; eval = every layer in eval mode, even
    # in trained parts (Keras' base_model(x, training=False)).
    bn: str = "frozen"
    reset_optimizer: bool = False  # drop optimizer state (e.g. Adam moments) at the stage start
    layer_decay: float | None = None  # backbone block i of n trains at lr * decay^(n-1-i)
    scheduler: SchedulerSpec | None = None  # None: the run's scheduler


@dataclass
class GradualSpec:
    """Head first, then one more backbone block unfrozen every ``every`` epochs, top down."""

    every: int = 2  # epochs of each stage
    blocks: int | None = None  # how many blocks to unfreeze in all (None: every block)
    head_epochs: int | None = None  # epochs of the head-only stage (None: every)
    block_lr_mult: float = 0.1  # LR of the first (top) unfrozen block, x optimizer.lr
    decay: float = 1.0  # each block further down trains at decay x the LR of the one above
    bn: str = "frozen"


@dataclass
class FreezeConfig:
    """A freeze policy: explicit ``stages``, or a ``gradual`` schedule expanded per backbone.

    Other scalar keys of a preset (``n``, ``k``, ``head_epochs``...) are its knobs: the
    stages refer to them by interpolation (``blocks[${freeze.n}:]``).
    """

    name: str
    stages: list[StageSpec] = field(default_factory=list)
    gradual: GradualSpec | None = None
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def total_epochs(self) -> int:
        """Epochs of the explicit stages (a gradual policy's depend on the backbone)."""
        return sum(s.epochs for s in self.stages)


@dataclass
class OptimizerConfig:
    name: str  # adam | adamw | sgd | rmsprop
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # apply weight decay to norm weights and biases too
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop smoothing constant


@dataclass
class TrainerConfig:
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int | None = None  # None: 2 x batch_size
    num_workers: int | None = None  # None: picked from the CPU count
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    deterministic: bool = False
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    channels_last: bool = True
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16)
    log_every_n_steps: int = 1
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_weights: str = "none"  # none | balanced: loss weights n / (k * count) per class
    sampler: str = "shuffle"  # shuffle | balanced: draw classes equally often (with replacement)


@dataclass
class TaskConfig:
    """What a run trains: a classifier (``classify``) or, without labels, a convolutional
    autoencoder whose encoder a classifier can restore later (``autoencoder``).

    The autoencoder's encoder is the run's backbone (``backbone=conv_encoder``: its
    ``channels`` and ``latent_dim``), so a classifier with the same backbone config restores it
    by name; the decoder mirrors it.
    """

    name: str = "classify"  # classify | autoencoder
    reconstructions: int = 8  # images shown (with their reconstructions) in TensorBoard


@dataclass
class RunConfig:
    name: str
    seed: int
    backbone: BackboneConfig
    head: HeadConfig
    dataset: DatasetConfig
    augment: AugmentConfig
    freeze: FreezeConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerSpec
    trainer: TrainerConfig
    task: TaskConfig = field(default_factory=TaskConfig)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # resolved config


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise UserError(f"{where} must be a list of {len(items)} values, got {value!r}")
        pairs = enumerate(zip(items, value, strict=True))
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in pairs)
    if tp in (int, float) and isinstance(value, bool):
        raise UserError(f"{where} must be {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise UserError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_mapping(cls: type, mapping: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a plain mapping; unknown or missing keys are user errors."""
    if cls is SelectorSpec and isinstance(mapping, str):
        return SelectorSpec(select=mapping)
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must be a mapping, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("raw", "knobs")}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in mapping if k not in fields]
    if cls is FreezeConfig:  # a preset's scalar knobs
        knobs = {k: mapping[k] for k in unknown if not isinstance(mapping[k], dict | list)}
        unknown = [k for k in unknown if k not in knobs]
    if unknown:
        raise UserError(
            f"unknown key {where}.{unknown[0]}{did_you_mean(unknown[0], fields)}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in mapping:
            kwargs[name] = _coerce(hints[name], mapping[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}.{name} is required")
    if cls is FreezeConfig:
        kwargs["knobs"] = knobs
    return cls(**kwargs)


GROUPS = {
    "backbone": BackboneConfig,
    "head": HeadConfig,
    "dataset": DatasetConfig,
    "augment": AugmentConfig,
    "freeze": FreezeConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerSpec,
    "trainer": TrainerConfig,
}


REQUIRED_RESOLVER = "transferlab_required"


def _required(key: str, what: str = "") -> Any:
    """``${transferlab_required:KEY,WHAT}``: a value the command line must give.

    (A preset cannot write ``???`` over a value set before it: OmegaConf keeps the earlier
    value when merging ``???``.)"""
    hint = f" ({what})" if what else ""
    raise UserError(f"{key} is not set: add {key}=...{hint} to the command line")


def _user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that an OmegaConf error wraps (raised by a resolver), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


if not OmegaConf.has_resolver(REQUIRED_RESOLVER):
    OmegaConf.register_new_resolver(REQUIRED_RESOLVER, _required)


def load_config(cfg: DictConfig | dict) -> RunConfig:
    """Resolve the composed Hydra config and map it onto :class:`RunConfig`."""
    if isinstance(cfg, DictConfig):
        try:  # both resolve interpolations
            missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
            if missing:
                raise UserError(f"{missing[0]} is not set: add {missing[0]}=... to the command "
                                "line")
            raw = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # interpolation errors, missing env vars
            if (user_error := _user_error_in(exc)) is not None:  # ${transferlab_required:...}
                raise user_error from None
            raise UserError(f"cannot resolve the config: {exc}") from None
    else:
        raw = dict(cfg)
    raw.pop("hydra", None)
    missing = [g for g in GROUPS if g not in raw]
    if missing:
        raise UserError(f"config group {missing[0]!r} is missing from the composed config")
    groups = {g: from_mapping(cls, raw[g], g) for g, cls in GROUPS.items()}
    if "task" in raw:  # runs saved before the task group existed are classifiers
        groups["task"] = from_mapping(TaskConfig, raw["task"], "task")
    run = RunConfig(name=str(raw.get("name", "run")), seed=int(raw.get("seed", 0)), raw=raw,
                    **groups)
    validate(run)
    return run


SCHEDULERS = ("constant", "cosine", "step", "onecycle")
TASKS = ("classify", "autoencoder")
BN_MODES = ("frozen", "train", "eval")


def validate_stage(stage: StageSpec, where: str) -> None:
    if stage.epochs < 0:
        raise UserError(f"{where}.epochs must be >= 0, got {stage.epochs}")
    if stage.bn not in BN_MODES:
        raise UserError(f"{where}.bn must be one of {', '.join(BN_MODES)}, got {stage.bn!r}")
    if not stage.train:
        raise UserError(f"{where} ({stage.name}) trains nothing: give 'train'")
    if stage.layer_decay is not None and not 0.0 < stage.layer_decay <= 1.0:
        raise UserError(f"{where}.layer_decay must be in (0, 1], got {stage.layer_decay}")
    if stage.scheduler is not None:
        validate_scheduler(stage.scheduler, f"{where}.scheduler")


def validate_scheduler(spec: SchedulerSpec, where: str) -> None:
    if spec.name not in SCHEDULERS:
        raise UserError(f"unknown {where}.name {spec.name!r}{did_you_mean(spec.name, SCHEDULERS)};"
                        f" choose one of {', '.join(SCHEDULERS)}")
    if spec.warmup_steps < 0 or spec.step_epochs < 1 or not 0.0 < spec.pct_start < 1.0:
        raise UserError(f"{where}: warmup_steps >= 0, step_epochs >= 1 and 0 < pct_start < 1")


def validate(run: RunConfig) -> None:
    """Cross-field checks that no single dataclass can make."""
    if run.task.name not in TASKS:
        raise UserError(f"unknown task {run.task.name!r}{did_you_mean(run.task.name, TASKS)}; "
                        f"choose one of {', '.join(TASKS)}")
    if run.task.reconstructions < 0:
        raise UserError(f"task.reconstructions must be >= 0, got {run.task.reconstructions}")
    policy = run.freeze
    if not policy.stages and policy.gradual is None:
        raise UserError(f"freeze policy {policy.name!r} has no stages")
    if policy.stages and policy.gradual is not None:
        raise UserError(f"freeze policy {policy.name!r} gives both stages and gradual: keep one")
    for i, stage in enumerate(policy.stages):
        validate_stage(stage, f"freeze.stages[{i}]")
    if policy.gradual is not None:
        if policy.gradual.every < 1:
            raise UserError(f"freeze.gradual.every must be >= 1, got {policy.gradual.every}")
        if policy.gradual.bn not in BN_MODES:
            raise UserError(f"freeze.gradual.bn must be one of {', '.join(BN_MODES)}, got "
                            f"{policy.gradual.bn!r}")
    elif sum(s.epochs for s in policy.stages) < 1:
        raise UserError("the freeze policy runs 0 epochs in total: set trainer.epochs >= 1")
    validate_scheduler(run.scheduler, "scheduler")
    if not 0.0 <= run.trainer.label_smoothing < 1.0:
        raise UserError(f"trainer.label_smoothing must be in [0, 1), got "
                        f"{run.trainer.label_smoothing}")
    for key, allowed in (("class_weights", ("none", "balanced")),
                         ("sampler", ("shuffle", "balanced"))):
        if getattr(run.trainer, key) not in allowed:
            raise UserError(f"trainer.{key} must be one of {', '.join(allowed)}, got "
                            f"{getattr(run.trainer, key)!r}")
    if run.trainer.batch_size < 1:
        raise UserError(f"trainer.batch_size must be >= 1, got {run.trainer.batch_size}")
    if not 0.0 < run.dataset.val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be in (0, 1), got {run.dataset.val_fraction}")
    if not 0.0 <= run.dataset.test_fraction < 1.0 - run.dataset.val_fraction:
        raise UserError(f"dataset.test_fraction must be in [0, 1 - val_fraction), got "
                        f"{run.dataset.test_fraction}")
    if not 0.0 < run.dataset.train_fraction <= 1.0:
        raise UserError(f"dataset.train_fraction must be in (0, 1], got "
                        f"{run.dataset.train_fraction}")
    if run.dataset.samples_per_class is not None and run.dataset.samples_per_class < 1:
        raise UserError(f"dataset.samples_per_class must be >= 1 (or null), got "
                        f"{run.dataset.samples_per_class}")
    if run.optimizer.lr <= 0:
        raise UserError(f"optimizer.lr must be > 0, got {run.optimizer.lr}")
