"""Checks of a typed run config that no field type can express: value ranges, options known to
the registries, fields that depend on each other, and options the run would not use. (Closed
sets of values are Enums in the schema: OmegaConf checks them at composition.)

:func:`validate` runs in :func:`~transferlab.config.load_config`, before any model is built or
any image is read. Every failure is one :class:`UserError` line naming the full key, the value
and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transferlab.config.schema import (
    AmpMode,
    AugmentConfig,
    CacheMode,
    ConvEncoderConfig,
    CosineSchedulerConfig,
    CropFlipConfig,
    DiscriminativeConfig,
    FakeDatasetConfig,
    FlipConfig,
    FreezeConfig,
    FreezeFirstNConfig,
    HeadConfig,
    LoraConfig,
    LpFtConfig,
    OneCycleSchedulerConfig,
    OptimizerConfig,
    RandAugmentConfig,
    RMSpropConfig,
    RunConfig,
    SchedulerConfig,
    SelectorSpec,
    SGDConfig,
    StageSpec,
    StandardAugmentConfig,
    StepSchedulerConfig,
    TopKConfig,
    TwoStageConfig,
)
from transferlab.config.typed import typed_object
from transferlab.errors import UserError, did_you_mean
from transferlab.registry import SCHEDULERS, TASKS

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def amp_mode(value: object) -> str:
    """``trainer.amp`` as the plain name of its :class:`AmpMode` (a saved run of an older
    version holds a bool: true/false read as auto/off), for values that did not come through
    the schema."""
    if (old := AmpMode.legacy(value)) is not None:
        return old.value
    text = str(value).strip().lower()
    if text not in AmpMode.values():
        raise UserError(f"trainer.amp must be one of {', '.join(AmpMode.values())}, got "
                        f"{value!r}{did_you_mean(str(value), AmpMode.values())}")
    return text


def check_value(key: str, value: Any, ok: bool, must: str) -> None:
    if not ok:
        raise UserError(f"{key} must be {must}, got {value!r}")


def _in(key: str, value: Any, lo: float, hi: float, lo_open: bool = False,
        hi_open: bool = False) -> None:
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    brackets = ("(" if lo_open else "[") + f"{lo:g}, {hi:g}" + (")" if hi_open else "]")
    check_value(key, value, above and below, f"in {brackets}")


def at_least(key: str, value: Any, lo: float, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    check_value(key, value, value is not None and value >= lo, f">= {lo:g}" +
                (" (or null)" if nullable else ""))


# --- per group ----------------------------------------------------------------------------------


def _backbone(run: RunConfig) -> None:
    b = run.backbone
    check_value("backbone.name", b.name, bool(b.name), "a model name")
    if b.weights_path is not None and not Path(b.weights_path).expanduser().is_file():
        raise UserError(f"backbone.weights_path: {b.weights_path} does not exist: give the file "
                        "of the pretrained weights (a .pth state dict or model.safetensors)")
    if b.init.path is not None and not Path(b.init.path).expanduser().is_file():
        raise UserError(f"backbone.init.path: {b.init.path} does not exist: give a checkpoint "
                        "file (a transferlab checkpoint, a state dict or a Lightning .ckpt)")
    if isinstance(b, ConvEncoderConfig):
        check_value("backbone.channels", b.channels, bool(b.channels) and min(b.channels) >= 1,
                    "a non-empty list of channel counts >= 1")
        at_least("backbone.latent_dim", b.latent_dim, 1)
        at_least("backbone.image_size", b.image_size, 2 ** len(b.channels))


def _head(run: RunConfig) -> None:
    h = run.head
    if isinstance(h, HeadConfig):
        _in("head.dropout", h.dropout, 0, 1, hi_open=True)


def _dataset(run: RunConfig) -> None:
    d = run.dataset
    _in("dataset.val_fraction", d.val_fraction, 0, 1, lo_open=True, hi_open=True)
    check_value("dataset.test_fraction", d.test_fraction, 0 <= d.test_fraction < 1 - d.val_fraction,
                "in [0, 1 - val_fraction)")
    _in("dataset.train_fraction", d.train_fraction, 0, 1, lo_open=True)
    at_least("dataset.samples_per_class", d.samples_per_class, 1, nullable=True)
    at_least("dataset.image_size", d.image_size, 1, nullable=True)
    at_least("dataset.folds", d.folds, 2, nullable=True)
    if d.folds is None and d.fold is not None:
        raise UserError(f"dataset.fold={d.fold} needs dataset.folds=<K>: set the number of folds "
                        "(e.g. dataset.folds=5), or drop dataset.fold")
    if d.folds is not None:
        check_value("dataset.fold", d.fold, d.fold is not None and 0 <= d.fold < d.folds,
                    f"a fold in [0, {d.folds}) (dataset.fold=range(0,{d.folds}) sweeps them all)")
    if d.crop_pct is not None:
        _in("dataset.crop_pct", d.crop_pct, 0, 1, lo_open=True)
    if isinstance(d, FakeDatasetConfig):
        at_least("dataset.num_classes", d.num_classes, 2)
        at_least("dataset.size", d.size, 2 * d.num_classes)


def _augment(run: RunConfig) -> None:
    a: AugmentConfig = run.augment
    if isinstance(a, FlipConfig):
        _in("augment.hflip", a.hflip, 0, 1)
    if isinstance(a, CropFlipConfig):
        _in("augment.scale_min", a.scale_min, 0, 1, lo_open=True)
    if isinstance(a, StandardAugmentConfig):
        _in("augment.rotation", a.rotation, 0, 180)
        _in("augment.shift", a.shift, 0, 1, hi_open=True)
        _in("augment.shear", a.shear, 0, 90, hi_open=True)
        _in("augment.zoom", a.zoom, 0, 1, hi_open=True)
    if isinstance(a, RandAugmentConfig):
        at_least("augment.num_ops", a.num_ops, 0)
        _in("augment.magnitude", a.magnitude, 0, 30)
    at_least("augment.mixup_alpha", a.mixup_alpha, 0)
    at_least("augment.cutmix_alpha", a.cutmix_alpha, 0)
    _in("augment.mix_prob", a.mix_prob, 0, 1)


def _optimizer(run: RunConfig) -> None:
    o: OptimizerConfig = run.optimizer
    check_value("optimizer.lr", o.lr, o.lr > 0, "> 0")
    check_value("optimizer.lr", o.lr, o.lr <= FLOAT32_MAX, "a float32 (<= 3.4e38)")
    at_least("optimizer.weight_decay", o.weight_decay, 0)
    betas = getattr(o, "betas", None)
    if betas is not None:
        check_value("optimizer.betas", list(betas),
                    len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)")
    if hasattr(o, "eps"):
        check_value("optimizer.eps", o.eps, o.eps > 0, "> 0")
    if isinstance(o, SGDConfig | RMSpropConfig):
        at_least("optimizer.momentum", o.momentum, 0)
    if isinstance(o, SGDConfig) and o.nesterov and o.momentum <= 0:
        raise UserError(f"optimizer.nesterov=true needs optimizer.momentum > 0, got "
                        f"{o.momentum}")
    if isinstance(o, RMSpropConfig):
        _in("optimizer.alpha", o.alpha, 0, 1, hi_open=True)


def scheduler(spec: SchedulerConfig, where: str) -> None:
    SCHEDULERS.get(spec.name, f"{where}.name")
    at_least(f"{where}.warmup_steps", spec.warmup_steps, 0)
    if isinstance(spec, CosineSchedulerConfig):
        _in(f"{where}.min_lr_mult", spec.min_lr_mult, 0, 1)
    if isinstance(spec, StepSchedulerConfig):
        at_least(f"{where}.step_epochs", spec.step_epochs, 1)
        check_value(f"{where}.gamma", spec.gamma, spec.gamma > 0, "> 0")
    if isinstance(spec, OneCycleSchedulerConfig):
        _in(f"{where}.pct_start", spec.pct_start, 0, 1, lo_open=True, hi_open=True)
        check_value(f"{where}.div_factor", spec.div_factor, spec.div_factor > 0, "> 0")
        check_value(f"{where}.final_div_factor", spec.final_div_factor, spec.final_div_factor > 0,
                    "> 0")


def selector(entry: Any, where: str) -> SelectorSpec:
    """A stage's ``train`` entry as a SelectorSpec (a string is ``select`` alone)."""
    if isinstance(entry, SelectorSpec):
        spec = entry
    elif isinstance(entry, str):
        spec = SelectorSpec(select=entry)
    elif isinstance(entry, dict):
        spec = typed_object(SelectorSpec, entry, where)
    else:
        raise UserError(f"{where} must be a selector (a string, or a mapping with select, lr, "
                        f"lr_mult), got {entry!r}")
    check_value(f"{where}.select", spec.select, bool(spec.select.strip()), "a selector")
    if spec.lr is not None:
        check_value(f"{where}.lr", spec.lr, spec.lr > 0, "> 0 (or null)")
    check_value(f"{where}.lr_mult", spec.lr_mult, spec.lr_mult > 0, "> 0")
    return spec


def stage_scheduler(value: Any, where: str) -> SchedulerConfig | None:
    """A stage's own scheduler as the typed config of the scheduler it names."""
    if value is None or isinstance(value, SchedulerConfig):
        spec = value
    else:
        name = value.get("name", "constant") if isinstance(value, dict) else None
        schema = SCHEDULERS.schema_of(name, f"{where}.name") if name else SchedulerConfig
        spec = typed_object(schema, value, where)
    if spec is not None:
        scheduler(spec, where)
    return spec


def stage(spec: StageSpec, where: str) -> None:
    """Check a stage; its ``train`` entries and ``scheduler`` become typed configs."""
    at_least(f"{where}.epochs", spec.epochs, 0)
    if not spec.train:
        raise UserError(f"{where} ({spec.name}) trains nothing: give {where}.train")
    spec.train = [selector(e, f"{where}.train[{i}]") for i, e in enumerate(spec.train)]
    if spec.layer_decay is not None:
        _in(f"{where}.layer_decay", spec.layer_decay, 0, 1, lo_open=True)
    spec.scheduler = stage_scheduler(spec.scheduler, f"{where}.scheduler")


def _freeze(run: RunConfig) -> None:
    policy: FreezeConfig = run.freeze
    # the policy's knobs first: the stages take their values from them
    if isinstance(policy, TwoStageConfig):
        at_least("freeze.head_epochs", policy.head_epochs, 0)
        at_least("freeze.finetune_epochs", policy.finetune_epochs, 0)
        check_value("freeze.finetune_lr_mult", policy.finetune_lr_mult,
                    policy.finetune_lr_mult > 0, "> 0")
    if isinstance(policy, LpFtConfig):
        at_least("freeze.probe_epochs", policy.probe_epochs, 0)
        at_least("freeze.finetune_epochs", policy.finetune_epochs, 0)
        check_value("freeze.finetune_lr_mult", policy.finetune_lr_mult,
                    policy.finetune_lr_mult > 0, "> 0")
    if isinstance(policy, LoraConfig):
        check_value("freeze.target", policy.target, bool(policy.target.strip()),
                    "a selector (blocks[-4:], backbone, a glob over parameter names)")
        at_least("freeze.rank", policy.rank, 1)
        check_value("freeze.alpha", policy.alpha, policy.alpha > 0, "> 0")
        _in("freeze.dropout", policy.dropout, 0, 1, hi_open=True)
    if isinstance(policy, TopKConfig):
        at_least("freeze.k", policy.k, 1)
    if isinstance(policy, FreezeFirstNConfig):
        at_least("freeze.n", policy.n, 0)
    if isinstance(policy, DiscriminativeConfig):
        _in("freeze.decay", policy.decay, 0, 1, lo_open=True)
    if not policy.stages and policy.gradual is None:
        raise UserError(f"freeze policy {policy.name!r} has no stages: give freeze.stages")
    if policy.stages and policy.gradual is not None:
        raise UserError(f"freeze policy {policy.name!r} gives both freeze.stages and "
                        "freeze.gradual: keep one")
    for i, spec in enumerate(policy.stages):
        stage(spec, f"freeze.stages[{i}]")
    if policy.gradual is not None:
        g = policy.gradual
        at_least("freeze.gradual.every", g.every, 1)
        at_least("freeze.gradual.blocks", g.blocks, 1, nullable=True)
        at_least("freeze.gradual.head_epochs", g.head_epochs, 0, nullable=True)
        check_value("freeze.gradual.block_lr_mult", g.block_lr_mult, g.block_lr_mult > 0, "> 0")
        _in("freeze.gradual.decay", g.decay, 0, 1, lo_open=True)
    elif policy.total_epochs < 1:
        raise UserError("the freeze policy runs 0 epochs in total: set trainer.epochs >= 1 (or "
                        "the policy's own epochs)")


def _trainer(run: RunConfig) -> None:
    t = run.trainer
    at_least("trainer.epochs", t.epochs, 0)
    at_least("trainer.pause_after_epoch", t.pause_after_epoch, 1, nullable=True)
    at_least("trainer.batch_size", t.batch_size, 1)
    at_least("trainer.eval_batch_size", t.eval_batch_size, 1, nullable=True)
    at_least("trainer.num_workers", t.num_workers, 0, nullable=True)
    check_value("trainer.device", t.device, bool(_DEVICE.match(t.device)),
                "auto, cpu, cuda, cuda:N or mps")
    at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    at_least("trainer.progress_seconds", t.progress_seconds, 0)
    _in("trainer.label_smoothing", t.label_smoothing, 0, 1, hi_open=True)
    c = t.feature_cache
    check_value("trainer.feature_cache.max_gb", c.max_gb, c.max_gb > 0, "> 0")
    check_value("trainer.feature_cache.lock_timeout", c.lock_timeout, c.lock_timeout > 0, "> 0")
    if t.ema.decay is not None:
        _in("trainer.ema.decay", t.ema.decay, 0, 1, lo_open=True, hi_open=True)
    at_least("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    if t.gradient_clip_val is not None:
        check_value("trainer.gradient_clip_val", t.gradient_clip_val, t.gradient_clip_val > 0,
                    "> 0 (or null: no clipping)")
    _regularize(run)
    e = t.early_stopping
    at_least("trainer.early_stopping.patience", e.patience, 1, nullable=True)
    at_least("trainer.early_stopping.min_delta", e.min_delta, 0)


def _task(run: RunConfig) -> None:
    """The checks the run's task owns (its registry entry's ``check``)."""
    TASKS.builder(run.task.name).check(run)


def _regularize(run: RunConfig) -> None:
    r = run.trainer.regularize
    at_least("trainer.regularize.alpha", r.alpha, 0)
    at_least("trainer.regularize.beta", r.beta, 0)
    if r.name == "none":
        return
    if run.optimizer.weight_decay > 0:
        raise UserError(f"trainer.regularize.name={r.name} replaces weight decay, but "
                        f"optimizer.weight_decay={run.optimizer.weight_decay}: add "
                        "optimizer.weight_decay=0 (the head's L2 is trainer.regularize.beta)")


# --- options the run would not use --------------------------------------------------------------

# (what the run is, predicate, keys or groups it does not use)
_UNUSED: list[tuple[str, Callable[[RunConfig], bool], tuple[str, ...]]] = [
    ("trainer.regularize.name=none adds no penalty",
     lambda run: run.trainer.regularize.name == "none",
     ("trainer.regularize.alpha", "trainer.regularize.beta")),
    ("no gradient clipping (trainer.gradient_clip_val=null) is done",
     lambda run: run.trainer.gradient_clip_val is None, ("trainer.gradient_clip_algorithm",)),
    ("early stopping is off until trainer.early_stopping.patience=N is given,",
     lambda run: run.trainer.early_stopping.patience is None,
     ("trainer.early_stopping.monitor", "trainer.early_stopping.min_delta",
      "trainer.early_stopping.restore_best")),
    ("no EMA is kept until trainer.ema.decay=D is given,",
     lambda run: run.trainer.ema.decay is None, ("trainer.ema.warmup",)),
    ("trainer.feature_cache.mode=off caches no features",
     lambda run: run.trainer.feature_cache.mode == CacheMode.off,
     ("trainer.feature_cache.dtype", "trainer.feature_cache.dir", "trainer.feature_cache.max_gb",
      "trainer.feature_cache.identity", "trainer.feature_cache.lock_timeout")),
    ("trainer.feature_cache.mode=memory takes no lock",
     lambda run: run.trainer.feature_cache.mode == CacheMode.memory,
     ("trainer.feature_cache.lock_timeout",)),
    ("the run trains on the whole training split (no dataset.train_fraction < 1 or "
     "dataset.samples_per_class)",
     lambda run: run.dataset.train_fraction >= 1 and run.dataset.samples_per_class is None,
     ("dataset.subset_seed",)),
]


def override_key(item: str) -> str:
    """``optimizer.lr`` of ``optimizer.lr=1e-3``, ``freeze`` of ``+freeze=two_stage``."""
    return item.lstrip("+~").partition("=")[0].replace("/", ".")


# Keys that say how far a session of the run goes, not what the run is: not in its record of
# overrides (HParams, the comparison tables), not compared when a job is resumed.
SESSION_KEYS = ("resume", "trainer.pause_after_epoch")


def is_session_override(item: str) -> bool:
    return override_key(item) in SESSION_KEYS


def unused(run: RunConfig, overrides: Iterable[str]) -> None:
    """An override that the run would ignore is an error, as an unknown key is."""
    keys = [(override_key(o), o) for o in overrides]
    task = TASKS.builder(run.task.name)
    owned = [(what, lambda run: True, ignored) for what, ignored in task.unused(run)]
    for what, applies, ignored in [*owned, *_UNUSED]:
        if not applies(run):
            continue
        for key, item in keys:
            if any(key == i or key.startswith(i + ".") for i in ignored):
                raise UserError(f"{what} and does not use {key}: remove {item!r}")


FLOAT32_MAX = 3.4028234663852886e38
SEED_RANGE = 2**32  # what every generator seeded from it takes (NumPy's, Python's, torch's)


def _run_level(run: RunConfig) -> None:
    check_value("seed", run.seed, 0 <= run.seed < SEED_RANGE, f"in 0 .. {SEED_RANGE - 1}")
    check_name(run.name)


def check_name(name: str) -> None:
    """A run's name names its directory under ``outputs/``: no path in it."""
    if any(c in name for c in "/\\") or name in ("", ".", "..") or name.startswith(".."):
        raise UserError(f"name={name} would put the run outside its folder: give a name "
                        "without / \\ or a leading .. (it names "
                        "outputs/runs/<date>/<time>_<name>)")


def validate(run: RunConfig, overrides: Iterable[str] = ()) -> None:
    """Every cross-field check; typed stage entries replace the raw ones in place."""
    for check in (_run_level, _backbone, _head, _dataset, _augment, _optimizer, _freeze,
                  _trainer, _task):
        check(run)
    scheduler(run.scheduler, "scheduler")
    unused(run, overrides)
