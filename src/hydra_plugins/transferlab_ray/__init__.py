"""``hydra/launcher=ray_tasks``: Hydra's Ray launcher (hydra-ray-launcher, the ``[ray]``
extra), started so that the sweep keeps its own stop signals (see :mod:`.ray_tasks_launcher`).
Light at import, and importable without the plugin: Hydra imports every plugin module when it
starts."""
