"""The schemas in Hydra's ConfigStore: ``schema/run`` (the root) and ``schema/<group>/<option>``
for every registered option; ``conf/<group>/<option>.yaml`` extends its schema in its defaults
list (``- /schema/optimizer/adam@_here_``)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from transferlab.config.schema import GROUPS, RunConfig
from transferlab.registry import BY_GROUP, load_builtins

_done = False


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
    _done = True
