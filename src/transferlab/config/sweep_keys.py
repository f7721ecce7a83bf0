"""Sweeps across the options of a group, with the keys of some of them.

``transferlab-train -m freeze=linear_probe,two_stage freeze.head_epochs=1`` compares two
policies at a budget, though ``head_epochs`` is a key of ``two_stage`` only. In a sweep a key that
belongs to at least one of the swept options of its group applies to the jobs whose option has
it; the sweep says in one line which jobs do not use it. A key that belongs to none of them
stays an error, and one run stays strict. The same for ``trainer.epochs`` when the sweep
crosses freeze policies that take their length from it and policies that set their own.

Two halves: :func:`optional_keys` reads the command line before Hydra starts (the launcher's
side, which also rewrites such a key as ``++key=value`` so that Hydra composes it into every
job), and :func:`drop_unused` removes it from the jobs whose option does not have it (the job's
side, told which keys by :data:`OPTIONAL_KEYS_ENV`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, flag_override

from transferlab.config.load import option_layers, uses_trainer_epochs
from transferlab.config.schema import GROUPS

OPTIONAL_KEYS_ENV = "TRANSFERLAB_SWEEP_OPTIONAL_KEYS"  # the keys some jobs of a sweep ignore
TRAINER_EPOCHS = "trainer.epochs"


@dataclass
class OptionalKey:
    """A key of the command line that some of a sweep's options of ``group`` have."""

    item: str  # the override as given
    key: str
    group: str
    users: list[str]  # the swept options that have it
    others: list[str]  # the swept options that do not
    jobs: int | None  # the sweep's jobs that do not use it (None: not countable)

    def line(self) -> str:
        """What the sweep says of it (one line)."""
        jobs = {None: "the jobs", 1: "the job"}.get(self.jobs, f"the {self.jobs} jobs")
        return (f"{self.key}: not used by {jobs} with {self.group}={','.join(self.others)} "
                f"(it belongs to {self.group}={','.join(self.users)})")


def _parsed(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra itself reports malformed command lines
        return []


def _options(override) -> list[str] | None:
    """The options a group override sweeps over (None: not a sweep, or not a list)."""
    if not override.is_sweep_override():
        return None
    try:
        return [str(v) for v in override.sweep_string_iterator()]
    except Exception:  # a glob or an interval: not enumerated here
        return None


def _has(group: str, option: str, key: str) -> bool | None:
    """Whether ``group=option`` has ``key`` (None: no such option file)."""
    layers = option_layers(group, option)
    if layers is None:
        return None
    base, own = layers
    if key == TRAINER_EPOCHS:
        merged = OmegaConf.merge(base, own)
        return uses_trainer_epochs(merged)
    field = key.split(".")[1].split("[")[0]
    return field in base or field in own


def optional_keys(argv: list[str]) -> list[OptionalKey]:
    """The overrides of a sweep's command line whose key only some of the swept options of its
    group have (the others are left as they are: all have it, or none does and composing
    the jobs says so)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parsed = _parsed(overrides)
    sweeps = [(o.get_key_element().lstrip("+~"), _options(o)) for o in parsed
              if o.is_sweep_override()]
    swept = {k: v for k, v in sweeps if k in GROUPS and v is not None}
    if not swept:
        return []
    lengths = [len(v) if v is not None else None for _, v in sweeps]
    total = math.prod(lengths) if None not in lengths else None
    found = []
    for item, o in zip(overrides, parsed, strict=False):
        key = o.get_key_element()
        if key.startswith(("+", "~")) or "." not in key:
            continue
        group = "freeze" if key == TRAINER_EPOCHS else key.split(".")[0]
        if group not in swept:
            continue
        have = {option: _has(group, option, key) for option in swept[group]}
        users = [name for name, has in have.items() if has]
        others = [name for name, has in have.items() if has is False]
        if users and others:
            jobs = total // len(swept[group]) * len(others) if total is not None else None
            found.append(OptionalKey(item, key, group, users, others, jobs))
    return found


def relaxed(argv: list[str], keys: list[OptionalKey]) -> list[str]:
    """``argv`` with each optional key given as ``++key=value``: composed into every job (the
    jobs without it drop it again: :func:`drop_unused`)."""
    rewrite = {k.item: f"++{k.item}" for k in keys if k.key != TRAINER_EPOCHS}
    return [rewrite.get(a, a) for a in argv]


def used_overrides(overrides: list[str], keys: list[str]) -> list[str]:
    """A job's overrides without the optional ``keys`` that its options do not have (read from
    the option files, before anything is composed): two jobs whose used overrides are the
    same train the same run."""
    from transferlab.config.validate import override_key

    choice = {override_key(o): o.partition("=")[2] for o in overrides
              if override_key(o) in GROUPS}
    used = []
    for item in overrides:
        key = override_key(item)
        group = "freeze" if key == TRAINER_EPOCHS else key.split(".")[0]
        if key in keys and group in choice and _has(group, choice[group], key) is False:
            continue
        used.append(item)
    return used


def drop_unused(cfg: DictConfig, overrides: list[str],
                keys: list[str]) -> tuple[DictConfig, list[str]]:
    """A sweep's job without the optional ``keys`` its option does not have: removed from its
    composed config and from its overrides (its record does not list them)."""
    from transferlab.config.validate import override_key

    unused, fields_out = [], {}
    for key in keys:
        group, _, rest = key.partition(".")
        if key == TRAINER_EPOCHS:
            if "freeze" in cfg and not uses_trainer_epochs(cfg.freeze):
                unused.append(key)
            continue
        node = cfg.get(group)
        field = rest.split(".")[0].split("[")[0]
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if field in (node or {}) and field not in getattr(schema, "__dataclass_fields__", {field}):
            fields_out.setdefault(group, set()).add(field)
            unused.append(key)
    for group, fields in fields_out.items():  # (a typed node cannot lose a key: rebuilt)
        node = cfg[group]
        data = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items()
                if k not in fields}
        with flag_override(cfg, ["struct", "readonly"], False):
            cfg[group] = OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(node)), data)
    if not unused:
        return cfg, overrides
    return cfg, [o for o in overrides if override_key(o) not in unused]
