r"""Typing a config by its schemas, and OmegaConf's and Hydra's exceptions as one-line
:class:`~transferlab.errors.UserError`\ s that name the key: what :mod:`.load` and
:mod:`.validate` share."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from transferlab.config.schema import GROUPS, AmpMode, FreezeConfig, RunConfig, StrEnum
from transferlab.errors import UserError, did_you_mean, error_line
from transferlab.registry import BY_GROUP, FREEZE_POLICIES

REQUIRED_RESOLVER = "transferlab_required"


def _required(key: str, what: str = "") -> Any:
    """``${transferlab_required:KEY,WHAT}``: a value the command line must give.

    (A preset cannot write ``???`` over a value set before it: OmegaConf keeps the earlier
    value when merging ``???``.)"""
    hint = f" ({what})" if what else ""
    raise UserError(f"{key} is not set: add {key}=...{hint} to the command line")


if not OmegaConf.has_resolver(REQUIRED_RESOLVER):
    OmegaConf.register_new_resolver(REQUIRED_RESOLVER, _required)


# --- one line for each kind of mistake ----------------------------------------------------------


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        nullable = " or null" if len(args) < len(typing.get_args(tp)) else ""
        return " or ".join(_type_name(a) for a in args) + nullable
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        return f"one of {', '.join(tp.values())}"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _closed_set_hint(full_key: str, expected: Any, value: Any) -> str:
    """The nearest allowed names of a closed set (or what an old value is written as now)."""
    if not (isinstance(expected, type) and issubclass(expected, StrEnum)):
        return ""
    if expected is AmpMode and (mode := AmpMode.legacy(value)) is not None:
        return f" (an older version's {str(value).lower()} is {full_key}={mode.value})"
    return did_you_mean(str(value), expected.values())


def _field_type(object_type: Any, key: Any) -> Any:
    if not (isinstance(object_type, type) and dataclasses.is_dataclass(object_type)):
        return None
    return typing.get_type_hints(object_type).get(str(key))


def _option_of(node_type: type, group: str) -> str | None:
    """The option whose schema ``node_type`` is (None where several options share it)."""
    registry = BY_GROUP.get(group)
    names = [e.name for e in registry if e.schema is node_type] if registry else []
    return names[0] if len(names) == 1 else None


def unknown_key_error(full_key: str, node_type: type, source: str = "") -> UserError:
    """``unknown key optimizer.momentum: optimizer=adam has no such key (...)``; ``source``: the
    config file that set it, when it is not the command line."""
    parent, _, key = full_key.rpartition(".")
    fields = [f.name for f in dataclasses.fields(node_type)]
    group = parent.split(".")[0].split("[")[0] if parent else ""
    option = _option_of(node_type, group) if parent == group else None
    where = f"{group}={option}" if option else (parent or "the run config")
    elsewhere = []
    if parent == group and group in BY_GROUP:
        elsewhere = [e.name for e in BY_GROUP[group]
                     if key in {f.name for f in dataclasses.fields(e.schema)}]
    hint = f" (it belongs to {group}={', '.join(elsewhere)})" if elsewhere else \
        did_you_mean(key, fields)
    origin = f"{source} sets " if source else "unknown key "
    return UserError(f"{origin}{full_key}: {where} has no such key{hint}; its keys: "
                     f"{', '.join(fields)}")


def omegaconf_error(exc: OmegaConfBaseException, where: str = "",
                    source: str = "") -> UserError:
    """One line for an OmegaConf error raised while merging, typing or resolving the config
    (``where``: the path of the node it was raised in, when that is not the root)."""
    full_key = str(getattr(exc, "full_key", "") or getattr(exc, "key", "") or "")
    if where:
        full_key = f"{where}.{full_key}" if full_key and not full_key.startswith("[") \
            else f"{where}{full_key}"
    object_type = getattr(exc, "object_type", None)
    if isinstance(exc, ConfigKeyError | ConfigAttributeError) and object_type is not None \
            and dataclasses.is_dataclass(object_type):
        return unknown_key_error(full_key, object_type, source)
    if isinstance(exc, ConfigKeyError) and object_type is dict and "." in full_key:
        mapping, _, key = full_key.rpartition(".")  # a new key of a mapping field (Hydra's rule)
        return UserError(f"{full_key}: {mapping} is a mapping, and Hydra adds a key to one with "
                         f"a leading +: write +{full_key}=<value> or "
                         f"'+{mapping}={{{key}: <value>}}'")
    if isinstance(exc, MissingMandatoryValue):
        return UserError(f"{full_key} is not set: add {full_key}=... to the command line")
    if isinstance(exc, ValidationError):
        expected = _field_type(object_type, getattr(exc, "key", None))
        value = getattr(exc, "value", None)
        if expected is not None:
            return UserError(f"{full_key} must be {_type_name(expected)}, got {value!r}"
                             f"{_closed_set_hint(full_key, expected, value)}")
        return UserError(f"{full_key}: {error_line(exc)}")
    if isinstance(exc, InterpolationResolutionError):
        return UserError(f"cannot resolve {full_key or 'the config'}: {error_line(exc)}")
    return UserError(f"{full_key + ': ' if full_key else ''}{error_line(exc)}")


_MISSING_OPTION = re.compile(r"Could not find '([^']+)/([^'/]+)'")
_OPTION_LIST = re.compile(r"Available options in '[^']+':\s*\n((?:\t.*\n?)*)")
# a preset of ours (conf/hydra/launcher/<name>.yaml) that extends a plugin's config which is
# not installed: its YAML's first lines say which pip extra adds the plugin
_PLUGIN_MISSING = re.compile(r"In '(hydra/launcher)/([\w-]+)': Could not load '([^']+)'")
_PIP_HINT = re.compile(r"pip install '[^']+'")


def plugin_missing(group: str, preset: str, base: str) -> UserError:
    """``hydra/launcher=<preset>`` whose plugin is not installed: one line with its extra."""
    from importlib.resources import files

    try:
        text = files("transferlab.conf").joinpath(group, f"{preset}.yaml").read_text()
    except OSError:
        text = ""
    hint = _PIP_HINT.search(text)
    how = hint.group(0) if hint else "install the Hydra plugin that provides it"
    return UserError(f"{group}={preset} needs a Hydra plugin that is "
                     f"not installed ({base} could not be loaded): {how}")


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that an error wraps (raised by a resolver), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# options that moved: (group, option) -> what to give instead
MOVED: dict[tuple[str, str], str] = {
    ("head", "logreg"): "task=logreg (its head.C and head.max_iter are task.C and task.max_iter)",
}


def composition_error(exc: BaseException) -> UserError:
    """One line for whatever Hydra raised while parsing the overrides or composing."""
    if (inner := user_error_in(exc)) is not None:
        return inner
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OmegaConfBaseException):
        source = re.match(r"In '([^']+)'", text)
        return omegaconf_error(cause, source=source.group(1) if source else "")
    if isinstance(exc, OmegaConfBaseException):
        return omegaconf_error(exc)
    if plugin := _PLUGIN_MISSING.search(text):
        return plugin_missing(*plugin.groups())
    missing = _MISSING_OPTION.search(text)
    if missing:
        group, option = missing.groups()
        if (group, option) in MOVED:
            return UserError(f"{group}={option} is now {MOVED[group, option]}")
        listed = _OPTION_LIST.search(text)
        options = [o.strip() for o in listed.group(1).splitlines() if o.strip()] if listed else []
        options = [o for o in options if not o.startswith("schema")]
        if not options and group.startswith("schema"):
            return UserError(f"unknown schema {group}/{option} in a config file's defaults list")
        choices = f"; choose one of {', '.join(options)}" if options else ""
        return UserError(f"unknown {group} option {option!r}{did_you_mean(option, options)}"
                         f"{choices}")
    return UserError(error_line(exc))


# --- strict keys, option names ------------------------------------------------------------------


def check_keys(node: Any, where: str = "") -> None:
    """Every key of every typed node is a field of its schema. (Hydra lets ``+key=value`` add
    keys to a typed node, and OmegaConf then drops them silently when it builds the objects.)"""
    if isinstance(node, DictConfig):
        node_type = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(node_type):
            names = {f.name for f in dataclasses.fields(node_type)}
            for key in node.keys():
                if key not in names and not (where == "" and key == "hydra"):
                    raise unknown_key_error(f"{where}.{key}" if where else str(key), node_type)
        for key in node.keys():
            if where == "" and key == "hydra":
                continue
            check_keys(node._get_node(key), f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            check_keys(node._get_node(i), f"{where}[{i}]")


def check_discriminator(group: str, node: Any) -> None:
    """The option a group's node names (``optimizer.name``, ``backbone.source``, ...) is
    registered and is the one whose schema the node has."""
    registry = BY_GROUP[group]
    node_type = OmegaConf.get_type(node)
    value = node._get_node(registry.key)
    if value is None or value._is_missing() or value._is_interpolation():
        return  # missing values are reported when the config resolves
    name = value._value()
    if group == "freeze" and name not in registry and node_type is FreezeConfig:
        return  # a policy of your own: explicit stages, no knobs
    schema = registry.schema_of(name)  # unknown name: one line with the choices
    if schema is not node_type:
        chosen = _option_of(node_type, group)
        option = f"{group}={chosen}" if chosen else "the chosen option"
        raise UserError(f"{group}.{registry.key}={name} does not match {option}, whose keys "
                        f"are for {chosen or node_type.__name__}: choose the option itself "
                        f"({group}={name} on the command line, or in the experiment's defaults)")


# --- plain config (a saved run) -> typed node ---------------------------------------------------


def _schema_for(group: str, value: Any) -> type:
    base = GROUPS[group]
    registry = BY_GROUP.get(group)
    if registry is None or not isinstance(value, dict):
        return base
    name = value.get(registry.key)
    if group == "freeze" and name not in FREEZE_POLICIES:
        return FreezeConfig
    return registry.schema_of(name) if name is not None else base


def _check_plain_keys(schema: Any, value: Any, where: str) -> None:
    """Unknown keys of plain data for ``schema``, named by their full path (OmegaConf names
    those inside list items by a relative one)."""
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                _check_plain_keys(arg, value, where)
        return
    if origin is list and args and isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain_keys(args[0], item, f"{where}[{i}]")
        return
    if not (dataclasses.is_dataclass(schema) and isinstance(value, dict)):
        return
    hints = typing.get_type_hints(schema)
    for key, item in value.items():
        if key not in hints:
            raise unknown_key_error(f"{where}.{key}", schema)
        _check_plain_keys(hints[key], item, f"{where}.{key}")


def typed(schema: type, value: Any, where: str) -> DictConfig:
    """``value`` (a mapping) checked and typed by ``schema``; mistakes name ``where``."""
    if not isinstance(value, dict | DictConfig):
        raise UserError(f"{where} must be a mapping, got {value!r}")
    if isinstance(value, dict):
        _check_plain_keys(schema, value, where)
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), value)
    except OmegaConfBaseException as exc:
        raise omegaconf_error(exc, where) from None
    return node


def typed_object(schema: type, value: Any, where: str) -> Any:
    """``value`` as an instance of ``schema`` (checked, typed, interpolations resolved)."""
    node = typed(schema, value, where)
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise omegaconf_error(exc, where) from None


def _legacy(raw: dict) -> dict:
    """A saved run's values that older versions wrote differently, as they read now: a
    boolean ``trainer.amp`` (True/False, or OmegaConf's "True"/"False" of one) is auto/off."""
    trainer = raw.get("trainer")
    if isinstance(trainer, dict) and (mode := AmpMode.legacy(trainer.get("amp"))) is not None:
        raw = {**raw, "trainer": {**trainer, "amp": mode.value}}
    return raw


def typed_run(raw: dict) -> DictConfig:
    """A plain run config (as saved in a checkpoint) typed by the schema of each option."""
    raw = _legacy(raw)
    root = OmegaConf.structured(RunConfig)
    unknown = [k for k in raw if k not in {f.name for f in dataclasses.fields(RunConfig)}]
    if unknown:
        raise unknown_key_error(str(unknown[0]), RunConfig)
    for key, value in raw.items():
        if key in GROUPS:
            root[key] = typed(_schema_for(key, value), value, key)
        else:
            try:
                root[key] = value
            except OmegaConfBaseException as exc:
                raise omegaconf_error(exc) from None
    return root
