"""Registries: one per pluggable kind (backbone sources, heads, optimizers, schedulers,
augmentations, datasets, freeze policies, tasks).

An option lives in exactly two places: its YAML file under ``conf/<group>/`` and one
registration here, which names it, gives its config schema (a dataclass, registered in Hydra's
ConfigStore so that a typo or a wrong type fails at composition) and, where code builds it, the
builder::

    @OPTIMIZERS.register("adam", AdamConfig)
    def _adam(cfg: AdamConfig, groups: list[dict]) -> torch.optim.Optimizer: ...

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
class Entry:
    name: str
    schema: type  # the dataclass of this option's config
    builder: Any = None  # what builds it (None where the config alone is the option)


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
                             f"({self._entries[name].builder!r} and {builder!r})")
        self._entries[name] = Entry(name, schema, builder)

        def decorate(fn: Any) -> Any:
            self._entries[name] = Entry(name, schema, fn)
            return fn

        return decorate

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def get(self, name: str, where: str | None = None) -> Entry:
        """The entry ``name``; an unknown name is a one-line error naming ``where`` (the key
        that gave it; default ``<group>.<key>``), the nearest names and all of them."""
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

# The modules whose import registers the built-in options.
_BUILTINS = (
    "transferlab.backbones",
    "transferlab.heads",
    "transferlab.data",
    "transferlab.data.transforms",
    "transferlab.staging.policy",
    "transferlab.staging.optim",
    "transferlab.staging.schedule",
    "transferlab.run.tasks",
)


def load_builtins() -> None:
    """Import the modules that register the built-in options (idempotent)."""
    for module in _BUILTINS:
        importlib.import_module(module)
