"""Hydra config tree of transferlab (packaged as transferlab.conf so installed commands find it)."""
