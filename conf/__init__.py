"""Hydra config tree of transferlab (packaged as transferlab.conf so installed commands find it).

Importing it stores the typed schemas that its YAML files extend in Hydra's ConfigStore."""

from transferlab.config.store import register_configs

register_configs()
