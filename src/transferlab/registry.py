"""Registries: one per pluggable kind (backbone sources, heads, optimizers, schedulers,
augmentations, datasets, freeze policies, tasks).

An option lives in exactly two places: its YAML file under ``conf/<group>/`` and one
registration, which names it, gives its config schema (a dataclass, registered in Hydra's
ConfigStore so that a typo or a wrong type fails at composition) and, where code builds it, the
builder. The built-in options are registered in :func:`load_builtins` below, each builder named
by where it lives (a :class:`Lazy` reference, imported when it first builds something), so that
composing a config, ``--help`` and a config error import no torch. An option of your own
registers the same way, or with its builder itself::

    @OPTIMIZERS.register("lion", LionConfig)
    def _lion(cfg: LionConfig, groups: list[dict]) -> torch.optim.Optimizer: ...

Registering a name twice raises; :meth:`Registry.get` of an unknown name is a one-line
:class:`~transferlab.errors.UserError` with the nearest names and the full list.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from transferlab.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Lazy:
    """A builder named by where it lives, ``"package.module:attribute"``, imported on first use."""

    path: str

    def load(self) -> Any:
        module, _, attribute = self.path.partition(":")
        found: Any = importlib.import_module(module)
        for part in attribute.split("."):
            found = getattr(found, part)
        return found


class Entry:
    """One option: its name, the dataclass of its config, and what builds it (None where the
    config alone is the option; a :class:`Lazy` reference is imported on first access)."""

    def __init__(self, name: str, schema: type, builder: Any = None):
        self.name, self.schema, self._builder = name, schema, builder

    @property
    def builder(self) -> Any:
        if isinstance(self._builder, Lazy):
            self._builder = self._builder.load()
        return self._builder

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self.schema.__name__}, {self._builder!r})"


class Registry:
    """Named options of one kind; ``key`` is the config field that selects one (its
    discriminator: ``name`` for most groups, ``source`` for backbones, ``kind`` for datasets)."""

    def __init__(self, group: str, key: str = "name"):
        self.group, self.key = group, key
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, schema: type, builder: Any = None) -> Callable:
        """Register ``name`` now (with ``builder``) or, used as a decorator, with the function
        it decorates. A name registered twice raises :class:`ValueError`."""
        if name in self._entries:
            raise ValueError(f"{self.group} {name!r} is registered twice "
                             f"({self._entries[name]._builder!r} and {builder!r})")
        self._entries[name] = Entry(name, schema, builder)

        def decorate(fn: Any) -> Any:
            self._entries[name] = Entry(name, schema, fn)
            return fn

        return decorate

    def names(self) -> list[str]:
        load_builtins()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        load_builtins()
        return iter(list(self._entries.values()))

    def get(self, name: str, where: str | None = None) -> Entry:
        """The entry ``name``; an unknown name is a one-line error naming ``where`` (the key
        that gave it; default ``<group>.<key>``), the nearest names and all of them."""
        load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            where = where or f"{self.group}.{self.key}"
            raise UserError(
                f"unknown {where} {name!r}{did_you_mean(str(name), self._entries)}; choose one "
                f"of {', '.join(self._entries)}") from None

    def builder(self, name: str) -> Any:
        return self.get(name).builder

    def schema_of(self, name: str, where: str | None = None) -> type:
        return self.get(name, where).schema


BACKBONE_SOURCES = Registry("backbone", key="source")
HEADS = Registry("head")
DATASETS = Registry("dataset", key="kind")
AUGMENTS = Registry("augment")
FREEZE_POLICIES = Registry("freeze")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
TASKS = Registry("task")

# config group -> its registry
BY_GROUP: dict[str, Registry] = {r.group: r for r in (
    BACKBONE_SOURCES, HEADS, DATASETS, AUGMENTS, FREEZE_POLICIES, OPTIMIZERS, SCHEDULERS, TASKS)}

_loaded = False


def load_builtins() -> None:
    """Register the built-in options (once): their names and schemas now, their builders by
    where they live, imported when they first build something."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from transferlab.config import schema as c

    backbones, data, heads = "transferlab.backbones", "transferlab.data", "transferlab.heads"
    augments, optim = "transferlab.data.transforms", "transferlab.staging.optim"
    schedule, policy = "transferlab.staging.schedule", "transferlab.staging.policy"
    for registry, name, schema, where in (
        (BACKBONE_SOURCES, "torchvision", c.TorchvisionBackboneConfig,
         f"{backbones}.torchvision_zoo:build_torchvision"),
        (BACKBONE_SOURCES, "timm", c.BackboneConfig, f"{backbones}.timm_zoo:build_timm"),
        (BACKBONE_SOURCES, "efficientnet_lite0_package", c.BackboneConfig,
         f"{backbones}.timm_zoo:build_efficientnet_lite0_package"),
        (BACKBONE_SOURCES, "efficientnet_lite1_package", c.BackboneConfig,
         f"{backbones}.timm_zoo:build_efficientnet_lite1_package"),
        (BACKBONE_SOURCES, "efficientnet_lite2_package", c.BackboneConfig,
         f"{backbones}.timm_zoo:build_efficientnet_lite2_package"),
        (BACKBONE_SOURCES, "transferlab", c.ConvEncoderConfig,
         f"{backbones}.conv_encoder:build_conv_encoder"),
        (HEADS, "linear", c.HeadConfig, f"{heads}:_linear"),
        (HEADS, "mlp", c.HeadConfig, f"{heads}:_mlp"),
        (HEADS, "flatten_dense", c.HeadConfig, f"{heads}:_flatten_dense"),
        (DATASETS, "digits", c.DatasetConfig, f"{data}:_digits"),
        (DATASETS, "image_folder", c.FolderDatasetConfig, f"{data}:_image_folder"),
        (DATASETS, "csv", c.CsvDatasetConfig, f"{data}:_csv"),
        (DATASETS, "torchvision", c.TorchvisionDatasetConfig, f"{data}:_torchvision"),
        (DATASETS, "fake", c.FakeDatasetConfig, f"{data}:_fake"),
        (DATASETS, "webdataset", c.WebDatasetConfig, f"{data}.shards:build_webdataset"),
        (DATASETS, "hf", c.HfDatasetConfig, f"{data}.hf:build_hf"),
        (AUGMENTS, "none", c.AugmentConfig, f"{augments}:_none"),
        (AUGMENTS, "flip", c.FlipConfig, f"{augments}:_flip"),
        (AUGMENTS, "randaugment", c.RandAugmentConfig, f"{augments}:_randaugment"),
        (AUGMENTS, "trivialaugment", c.TrivialAugmentConfig, f"{augments}:_trivialaugment"),
        (AUGMENTS, "crop_flip", c.CropFlipConfig, f"{augments}:_crop_flip"),
        (AUGMENTS, "standard", c.StandardAugmentConfig, f"{augments}:_standard"),
        # a freeze policy's entry says how a resume extends its last stage (staging.policy)
        (FREEZE_POLICIES, "linear_probe", c.FreezeConfig, f"{policy}:ONE_STAGE"),
        (FREEZE_POLICIES, "none", c.FreezeConfig, f"{policy}:ONE_STAGE"),
        (FREEZE_POLICIES, "scratch", c.FreezeConfig, f"{policy}:ONE_STAGE"),
        (FREEZE_POLICIES, "gradual", c.FreezeConfig, f"{policy}:PLANNED"),
        (FREEZE_POLICIES, "discriminative", c.DiscriminativeConfig, f"{policy}:ONE_STAGE"),
        (FREEZE_POLICIES, "freeze_first_n", c.FreezeFirstNConfig, f"{policy}:ONE_STAGE"),
        (FREEZE_POLICIES, "top_k", c.TopKConfig, f"{policy}:ONE_STAGE"),
        (FREEZE_POLICIES, "two_stage", c.TwoStageConfig, f"{policy}:FINETUNE"),
        (FREEZE_POLICIES, "lp_ft", c.LpFtConfig, f"{policy}:FINETUNE"),
        (FREEZE_POLICIES, "surgical", c.SurgicalConfig, f"{policy}:ONE_STAGE"),
        (FREEZE_POLICIES, "lora", c.LoraConfig, f"{policy}:ONE_STAGE"),
        (OPTIMIZERS, "adam", c.AdamConfig, f"{optim}:_adam"),
        (OPTIMIZERS, "adamw", c.AdamWConfig, f"{optim}:_adamw"),
        (OPTIMIZERS, "sgd", c.SGDConfig, f"{optim}:_sgd"),
        (OPTIMIZERS, "rmsprop", c.RMSpropConfig, f"{optim}:_rmsprop"),
        (SCHEDULERS, "constant", c.SchedulerConfig, f"{schedule}:_constant"),
        (SCHEDULERS, "cosine", c.CosineSchedulerConfig, f"{schedule}:_cosine"),
        (SCHEDULERS, "step", c.StepSchedulerConfig, f"{schedule}:_step"),
        (SCHEDULERS, "onecycle", c.OneCycleSchedulerConfig, f"{schedule}:_onecycle"),
        # a task's entry: its model, stages, objectives, checks and hooks (run.tasks)
        (TASKS, "classify", c.TaskConfig, "transferlab.run.tasks:CLASSIFY"),
        (TASKS, "logreg", c.LogRegTaskConfig, "transferlab.run.tasks:LOGREG"),
        (TASKS, "autoencoder", c.AutoencoderTaskConfig, "transferlab.run.tasks:AUTOENCODE"),
    ):
        registry.register(name, schema, Lazy(where) if where else None)
