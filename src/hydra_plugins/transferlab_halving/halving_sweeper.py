"""``hydra/sweeper=halving``: successive halving over a sweep's configurations.

A Hydra sweeper plugin (found by Hydra's plugin discovery in the ``hydra_plugins`` namespace):
it launches each rung as one batch through the configured launcher (basic, joblib,
submitit_local, slurm). What it decides with (rung budgets, ranking, the record) is
:mod:`transferlab.tools.halving`; this module is the Hydra side. Light at import: Hydra imports
every plugin module when it starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("transferlab")


@dataclass
class HalvingSweeperConf:
    """``hydra.sweeper.*`` of ``hydra/sweeper=halving`` (docs/sweeps.md, "Halving")."""

    _target_: str = "hydra_plugins.transferlab_halving.halving_sweeper.HalvingSweeper"
    eta: int = 3  # the best 1/eta of a rung's configurations go on
    min_epochs: int = 1  # the first rung's budget; rung r: min_epochs * eta**r
    rungs: Any = None  # or the budgets of the rungs, given: [1, 3, 9]
    max_epochs: Any = None  # None: each plan's own length; else the last rung's budget
    metric: str = "val_acc"  # what ranks the configurations (a key of metrics.json's epochs)
    mode: str = "max"  # max | min
    samples: Any = None  # configurations drawn (seeded) when the sweep has interval(...)s
    seed: int = 0  # the draws of samples
    # keys whose values are one configuration's jobs (ranked by their mean): k-fold, seeds
    average_over: list[str] = field(default_factory=lambda: ["dataset.fold", "seed"])
    params: Any = None  # more overrides of the sweep, as {key: "a,b,c"} (as the command line)


ConfigStore.instance().store(group="hydra/sweeper", name="halving", node=HalvingSweeperConf,
                             provider="transferlab")


class HalvingSweeper(Sweeper):
    def __init__(self, eta: int, min_epochs: int, rungs: Any, max_epochs: Any, metric: str,
                 mode: str, samples: Any, seed: int, average_over: Any, params: Any) -> None:
        self.eta, self.min_epochs, self.max_epochs = eta, min_epochs, max_epochs
        self.rungs = list(rungs) if rungs is not None else None
        self.metric, self.mode, self.samples, self.seed = metric, mode, samples, seed
        self.average_over = [str(k) for k in average_over or []]
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from transferlab.config.sweep_keys import OPTIONAL_KEYS_ENV
        from transferlab.tools.halving import Halving, HalvingPlan, configurations

        given = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        optional = [k for k in os.environ.get(OPTIONAL_KEYS_ENV, "").split(",") if k]
        configs = configurations(parser.parse_overrides(given), self.average_over,
                                 self.samples, self.seed, optional)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # (resume=auto finds it)
        plan = HalvingPlan(self.eta, self.min_epochs, self.rungs, self.max_epochs)
        halving = Halving(plan, configs, sweep_dir, self.metric, self.mode)
        self.validate_batch_is_legal([job.overrides for c in configs for job in c.jobs])
        alive, rung, launched = configs, 0, 0
        while True:
            batch = halving.rung_jobs(rung, alive)
            pause = plan.pause_point(rung, len(alive))
            log.info("halving: rung %d, %d configuration(s) to %s: %d job(s) to launch", rung,
                     len(alive), f"epoch {pause}" if pause else "the end of their plans",
                     len(batch))
            if batch:
                self.launcher.launch(batch, initial_job_idx=launched)
                launched += len(batch)
            stopped = halving.unfinished(alive)
            if stopped:  # a stop (Ctrl-C) ended jobs part-way: resume=auto goes on
                log.warning("halving: rung %d did not finish (%s): not ranked", rung,
                            ", ".join(stopped[:3]))
                return None
            going_on = halving.score(rung, alive)
            if halving.rungs[-1]["last"]:
                break
            alive, rung = going_on, rung + 1
        halving.mark_runs()
        print(f"\nHalving ({self.metric}, {self.mode}; eta {self.eta}):\n{halving.table()}",
              flush=True)
        return None
