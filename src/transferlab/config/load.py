"""From a composed Hydra config (or a run's saved plain config) to a validated
:class:`~transferlab.config.schema.RunConfig`, with every mistake as one line.

Hydra types the config while it composes it (the schemas in the ConfigStore), so most mistakes
fail there; :func:`composition_error` turns Hydra's and OmegaConf's multi-line exceptions into
one :class:`UserError` line that names the key. What composition lets through (keys added with
``+key=...``, names of unknown options, cross-field mistakes) is caught by :func:`load_config`,
still before anything is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    OmegaConfBaseException,
)

from transferlab.config.schema import GROUPS, FreezeConfig, RunConfig
from transferlab.config.typed import (
    check_discriminator,
    check_keys,
    composition_error,
    omegaconf_error,
    typed_run,
    user_error_in,
)
from transferlab.errors import UserError, did_you_mean
from transferlab.registry import BY_GROUP, TASKS, load_builtins

# --- the whole step -----------------------------------------------------------------------------


def load_config(cfg: DictConfig | dict, overrides: Iterable[str] = ()) -> RunConfig:
    """The validated, typed run config of a composed Hydra config (or of a plain mapping, as a
    checkpoint saves it). ``overrides`` are the command line's, for the checks of options the
    run would not use. Nothing is built: every mistake is a one-line :class:`UserError`."""
    from transferlab.config.validate import validate

    load_builtins()
    if isinstance(cfg, DictConfig):
        node = cfg
        if not dataclasses.is_dataclass(OmegaConf.get_type(node)):
            node = typed_run(OmegaConf.to_container(node, resolve=False))
    else:
        node = typed_run(dict(cfg))
    check_keys(node)
    for group in BY_GROUP:
        if group in node:
            check_discriminator(group, node._get_node(group))
    try:
        run = OmegaConf.to_object(node)
    except Exception as exc:  # missing values, interpolations, resolvers, late type errors
        if (user_error := user_error_in(exc)) is not None:
            raise user_error from None
        if isinstance(exc, OmegaConfBaseException):
            raise omegaconf_error(exc) from None
        raise
    if not isinstance(run, RunConfig):
        raise UserError("the composed config is not a run config (conf/train.yaml must start "
                        "with the schema/run default)")
    validate(run, overrides)
    if "freeze" in node and not uses_trainer_epochs(node.freeze):
        _epochs_unused(run, overrides)
    return run


def uses_trainer_epochs(freeze: DictConfig) -> bool:
    """Whether the freeze policy's stages take their epochs from ``trainer.epochs``."""
    return "trainer.epochs" in str(OmegaConf.to_container(freeze, resolve=False))


def _epochs_unused(run: RunConfig, overrides: Iterable[str]) -> None:
    """``trainer.epochs`` given to a policy that sets its own epochs is an error, not ignored."""
    from transferlab.config.validate import override_key

    given = [o for o in overrides if override_key(o) == "trainer.epochs"]
    if not given or not TASKS.builder(run.task.name).stages_from_freeze(run):
        return
    if run.freeze.gradual is not None:
        length = ("freeze.gradual.head_epochs + freeze.gradual.every x freeze.gradual.blocks "
                  "epochs")
    else:
        length = " + ".join(f"{s.name} {s.epochs}" for s in run.freeze.stages) + " epochs"
        knobs = [f"freeze.{k}" for k in ("head_epochs", "finetune_epochs")
                 if hasattr(run.freeze, k)]
        length += f": {', '.join(knobs)}" if knobs else ""
    raise UserError(f"freeze={run.freeze.name} sets its own length ({length}) and does not use "
                    f"trainer.epochs: remove {given[0]!r}")


def compose_config(overrides: Iterable[str] = (), with_hydra: bool = False) -> DictConfig:
    """The config ``transferlab-train <overrides>`` composes (from the packaged ``conf/``;
    ``with_hydra``: its ``hydra`` node too); Hydra's errors become one-line
    :class:`UserError`\\ s."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from transferlab.config.store import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="transferlab.conf", version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides),
                           return_hydra_config=with_hydra)
    except UserError:
        raise
    except Exception as exc:  # Hydra's override and composition errors
        raise composition_error(exc) from None
    finally:
        GlobalHydra.instance().clear()


# --- one option of a group, read as Hydra composes it -------------------------------------------

_GLOBAL = "# @package _global_"


def option_layers(group: str, option: str) -> tuple[DictConfig, dict[str, Any]] | None:
    """``conf/<group>/<option>.yaml`` as Hydra composes it into ``group``: the typed node its
    defaults list gives (its schema from the ConfigStore, or the option of the group that it
    extends) and the file's own values for ``group`` (plain data, interpolations kept). None
    when the group has no such file.

    A ``# @package _global_`` file gives the values it sets under ``group`` only
    (``freeze=scratch`` also sets ``backbone.pretrained``). The conf tree uses these defaults
    only: ``/schema/<group>/<name>@_here_`` (``@<group>`` in a global file), another option of
    the group, then ``_self_``; anything else is a ValueError here.
    """
    from hydra.core.config_store import ConfigStore

    from transferlab.config.store import register_configs

    if group not in GROUPS:
        raise UserError(f"unknown config group {group!r}{did_you_mean(group, GROUPS)}; choose "
                        f"one of {', '.join(GROUPS)}")
    path = resources.files("transferlab.conf").joinpath(group, f"{option}.yaml")
    if not path.is_file():
        return None
    register_configs()
    text = path.read_text()
    is_global = text.lstrip().startswith(_GLOBAL)
    data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    defaults = data.pop("defaults", [])
    own = data.get(group, {}) if is_global else data
    where = f"conf/{group}/{option}.yaml"
    if defaults and defaults[-1] != "_self_" or defaults.count("_self_") > 1:
        raise ValueError(f"{where}: its defaults list must end with _self_")
    base = OmegaConf.structured(GROUPS[group])  # no defaults list: the type of the run's field
    for entry in defaults[:-1]:
        target, _, package = str(entry).partition("@")
        if target.startswith("/schema/") and package == (group if is_global else "_here_"):
            base = OmegaConf.merge(base, ConfigStore.instance().load(f"{target[1:]}.yaml").node)
        elif "/" not in target and not package and not is_global:
            extended = option_layers(group, target)
            if extended is None:
                raise ValueError(f"{where}: its default {entry!r} names no option of {group}")
            base = OmegaConf.merge(*extended)
        else:
            raise ValueError(f"{where}: a default make_config does not read: {entry!r}")
    return base, own


def make_config(group: str, option: str, **fields: Any) -> Any:
    """The typed config that ``group=option`` gives a run, in code: ``make_config("optimizer",
    "sgd", lr=0.1)`` is the :class:`SGDConfig` of ``conf/optimizer/sgd.yaml`` with ``lr=0.1``.

    The option's file is read as Hydra composes it (:func:`option_layers`), so for every
    option of ``conf/`` this is ``load_config(<group>=<option>).<group>`` (a test checks each),
    with two provisos: interpolations to other groups resolve against their schema defaults
    (``${trainer.epochs}``: 5, ``${seed}``: 0), the values the default run gives them; and a
    ``# @package _global_`` option gives its own group only (``freeze=scratch`` also turns
    ``backbone.pretrained`` off in a run). A stage's ``train`` entries become
    :class:`SelectorSpec`\\ s, as :func:`load_config` makes them. A registered option without a
    file (a backbone ``source``, a dataset ``kind``) is its schema's defaults, as before."""
    load_builtins()
    layers = option_layers(group, option)
    if layers is None:
        registry = BY_GROUP.get(group)
        if registry is None or option not in registry:
            options = sorted(p.name[:-5] for p in resources.files("transferlab.conf")
                             .joinpath(group).iterdir() if p.name.endswith(".yaml"))
            raise UserError(f"unknown {group} option {option!r}{did_you_mean(option, options)}; "
                            f"choose one of {', '.join(options)}")
        return registry.schema_of(option)(**{registry.key: option, **fields})
    root = OmegaConf.structured(RunConfig)
    root[group] = OmegaConf.merge(*layers)
    try:
        for key, value in fields.items():
            root[group][key] = value
        made = OmegaConf.to_object(root[group])
    except OmegaConfBaseException as exc:
        raise omegaconf_error(exc) from None
    if isinstance(made, FreezeConfig):
        from transferlab.config.validate import stage

        for i, spec in enumerate(made.stages):
            stage(spec, f"{group}.stages[{i}]")
    return made
