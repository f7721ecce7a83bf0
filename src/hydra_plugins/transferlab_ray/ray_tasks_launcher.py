"""``hydra/launcher=ray_tasks`` (conf/hydra/launcher/ray_tasks.yaml): the jobs of a sweep as
tasks of Hydra's Ray launcher (hydra-ray-launcher, the ``[ray]`` extra).

``ray.init`` replaces the SIGTERM handler of the process that calls it (with ``sys.exit``): a
SIGTERM to the sweep would end it at once, and its Ray with it, the jobs unsaved. Here Ray is
started first, as the plugin starts it, and the sweep's own handlers
(:class:`transferlab.infra.job_process.SweepStop`: the jobs save and end ``interrupted``) are
put back before the plugin launches the jobs; the plugin then finds Ray running. The plugin is
imported when the launcher is made, not with this module (Hydra imports every plugin module
when it starts, and the extra may not be installed).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

_STOPS = (signal.SIGINT, signal.SIGTERM)


class RayTasksLauncher(Launcher):
    """The plugin's ``RayLauncher`` (every ``hydra.launcher.ray.*`` key is its), with Ray
    started here first (see the module)."""

    def __init__(self, ray: DictConfig) -> None:
        from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher

        self.ray_cfg = ray
        self._plugin = RayLauncher(ray)

    def setup(self, **kwargs: Any) -> None:
        self._plugin.setup(**kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.hydra_ray_launcher._launcher_util import start_ray

        handlers = {s: signal.getsignal(s) for s in _STOPS}
        with open_dict(self.ray_cfg):  # the plugin's default, which it sets before its start
            self.ray_cfg.init.setdefault("object_store_memory", 78643200)
        start_ray(self.ray_cfg.init)
        for s, handler in handlers.items():
            if handler is not None:
                signal.signal(s, handler)
        return self._plugin.launch(job_overrides, initial_job_idx)
