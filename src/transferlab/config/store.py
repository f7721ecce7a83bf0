"""The schemas in Hydra's ConfigStore: ``schema/run`` (the root) and ``schema/<group>/<option>``
for every registered option; ``conf/<group>/<option>.yaml`` extends its schema in its defaults
list (``- /schema/optimizer/adam@_here_``)."""

from __future__ import annotations

from importlib import resources

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from transferlab.config.schema import GROUPS, RunConfig
from transferlab.registry import BY_GROUP, load_builtins

_done = False
OPTIONS_RESOLVER = "transferlab_options"


def options_text() -> str:
    """``group: option, ...`` for every group of the packaged ``conf/`` (the help's list: the
    schemas, which are not options, left out)."""
    conf = resources.files("transferlab.conf")
    lines = []
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name[0] != "_"):
        options = sorted(p.name[:-5] for p in conf.joinpath(group).iterdir()
                         if p.name.endswith(".yaml"))
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines) + "\n"


if not OmegaConf.has_resolver(OPTIONS_RESOLVER):
    OmegaConf.register_new_resolver(OPTIONS_RESOLVER, options_text)


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent). Called before any composition:
    by the console scripts, by ``transferlab.conf`` on import, and by :func:`compose_run`."""
    global _done
    if _done:
        return
    load_builtins()
    store = ConfigStore.instance()
    store.store(group="schema", name="run", node=RunConfig)
    for group, base in GROUPS.items():
        store.store(group=f"schema/{group}", name="base", node=base)
        if group in BY_GROUP:
            for entry in BY_GROUP[group]:
                store.store(group=f"schema/{group}", name=entry.name, node=entry.schema)
    register_plugins()
    _done = True


def register_plugins() -> None:
    """``hydra/sweeper=halving`` (the plugin module stores its config on import) and the
    launcher of ``hydra/launcher=ray_tasks``. Hydra's plugin discovery finds their classes in
    an installed package, but not through the import hook of an editable install (``pip
    install -e``), so they are also registered here."""
    from hydra.core.plugins import Plugins

    import hydra_plugins.transferlab_halving.halving_sweeper as halving
    import hydra_plugins.transferlab_ray.ray_tasks_launcher as ray_tasks

    Plugins.instance().register(halving.HalvingSweeper)
    Plugins.instance().register(ray_tasks.RayTasksLauncher)
