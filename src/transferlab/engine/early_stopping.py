"""Early stopping per stage (``trainer.early_stopping``).

Within each stage, the monitored value (``val_loss``: lower is better; ``val_acc``: higher)
is compared with the stage's reference so far; an epoch improves on it when it is better by
more than ``min_delta`` (the stage's first epoch always sets it). After ``patience`` epochs in a
row without improvement the stage ends there, and the run goes on with the next stage at its
planned epoch number (the epochs left out are a gap in the record), or ends. With
``restore_best`` the model (the whole ``built.model``, which a feature-cached stage's remainder
shares its parameters with) gets the weights of the stage's best epoch back first (the best by
``best.pt``'s tie rule, :mod:`transferlab.engine.best`: an epoch that equals the best's
monitored value and beats it on the other metric, e.g. the same val_acc at a lower val_loss,
becomes the best, though it resets no patience), so the next
stage starts from them; a run whose last stage stopped ends with them in memory (``last.pt``
keeps the last epoch's weights, ``best.pt`` the best epoch of the whole run as always).

Resume: the counters (and, with ``restore_best``, the best epoch's weights when they differ
from the checkpoint's own) go into every checkpoint's ``loop["early_stopping"]``, so an
interrupted run stops and restores exactly as one that never stopped.

Records: ``metrics.json["stopped_early"]`` lists each stage that stopped early (stage, epoch,
planned last epoch, monitor, best value and epoch, restored); the log says so, TensorBoard has
the line under ``early_stopping/<stage>``, and the learning curves mark it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from transferlab.config import EarlyStoppingConfig
from transferlab.engine.best import epoch_rank
from transferlab.run.record import RunTracker
from transferlab.staging.policy import StagePlan

log = logging.getLogger("transferlab")

RECORD_KEY = "stopped_early"  # metrics.json


class EarlyStopping:
    """One run's early stopping, stage by stage (every method is a no-op while it is off)."""

    def __init__(self, config: EarlyStoppingConfig, tracker: RunTracker,
                 resumed_epoch: int | None = None):
        self.config, self.tracker = config, tracker
        self.on = config.patience is not None
        self.plan: StagePlan | None = None
        self._reset()
        if resumed_epoch is not None and RECORD_KEY in tracker.extra:
            # stops written after the checkpoint the run goes on from happen again (or not)
            tracker.extra[RECORD_KEY] = [s for s in tracker.extra[RECORD_KEY]
                                         if s["epoch"] <= resumed_epoch]

    def _reset(self) -> None:
        self.wait, self.best, self.ref_epoch = 0, None, None  # best: the patience's reference
        self.best_epoch, self.best_rank = None, None  # the stage's best epoch (engine.best)
        self.best_state: dict[str, torch.Tensor] | None = None  # restore_best: its weights
        self.stopped, self.epoch = False, None  # epoch: the last one updated

    # -- a stage ---------------------------------------------------------------------------
    def begin(self, plan: StagePlan, resumed: dict | None = None,
              resumed_model: dict | None = None) -> None:
        """A stage starts. A resumed one: ``resumed`` is the state its checkpoint saved,
        ``resumed_model`` the checkpoint's model (the best one's weights when the checkpoint
        was written after the best epoch)."""
        self.plan = plan
        self._reset()
        if not self.on or resumed is None or resumed.get("stage") != plan.index:
            return
        self.wait, self.best, self.best_epoch = resumed["wait"], resumed["best"], \
            resumed["best_epoch"]
        self.ref_epoch = resumed.get("ref_epoch", self.best_epoch)
        rank = resumed.get("best_rank")  # (absent from checkpoints of earlier versions)
        self.best_rank = tuple(rank) if rank is not None else self._rank_of_value(self.best)
        self.stopped, self.epoch = resumed["stopped"], resumed["epoch"]
        self.best_state = resumed.get("best_model")
        if self.best_state is None and self.config.restore_best:
            self.best_state = resumed_model  # written after the best epoch itself
        if self.stopped:
            log.info("stage '%s' had stopped early after epoch %s: it trains no more epochs",
                     plan.name, self.epoch)

    def describe(self) -> str:
        """A line under the stage table."""
        c = self.config
        if not self.on:
            return ""
        return (f"\nearly stopping: {c.monitor}, patience {c.patience}, min_delta {c.min_delta:g}"
                f"{', restores the best epoch' if c.restore_best else ''}")

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.config.monitor == "val_acc":
            return value > self.best + self.config.min_delta
        return value < self.best - self.config.min_delta

    def _rank_of_value(self, value: float | None) -> tuple[float, float] | None:
        """The rank of a best known by its monitored value only (an earlier checkpoint)."""
        if value is None:
            return None
        return (value, float("-inf")) if self.config.monitor == "val_acc" else \
            (-value, float("-inf"))

    def _best_value(self) -> float | None:
        """The monitored value of the stage's best epoch."""
        if self.best_rank is None:
            return None
        return self.best_rank[0] if self.config.monitor == "val_acc" else -self.best_rank[0]

    def update(self, record: dict, model: nn.Module) -> bool:
        """After an epoch's evaluation (before its checkpoint): whether the stage stops now.
        A new best epoch's weights are kept (restore_best)."""
        if not self.on:
            return False
        self.epoch, value = record["epoch"], float(record[self.config.monitor])
        improved = self._better(value)
        if improved:
            self.wait, self.best, self.ref_epoch = 0, value, self.epoch
        else:
            self.wait += 1
        rank = epoch_rank(record, self.config.monitor)
        tie_won = (self.best_rank is not None and rank[0] == self.best_rank[0]
                   and rank > self.best_rank)  # the same value, the other metric better
        if improved or tie_won:
            self.best_epoch, self.best_rank = self.epoch, rank
            if self.config.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.stopped = self.wait >= self.config.patience
        if self.stopped:
            self._record()
        return self.stopped

    def state(self, partial: bool = False) -> dict[str, Any]:
        """What a checkpoint keeps (``loop["early_stopping"]``); ``partial``: one written
        part-way through an epoch (its model is not the last evaluated epoch's)."""
        if not self.on or self.plan is None:
            return {}
        state = {"stage": self.plan.index, "epoch": self.epoch, "wait": self.wait,
                 "best": self.best, "best_epoch": self.best_epoch, "stopped": self.stopped,
                 "ref_epoch": self.ref_epoch, "best_rank": self.best_rank}
        if self.config.restore_best and self.best_epoch is not None and (
                partial or self.best_epoch != self.epoch):
            state["best_model"] = self.best_state  # else the checkpoint's own model
        return {"early_stopping": state}

    def end(self, model: nn.Module, next_stage: StagePlan | None) -> None:
        """The stage is over: if it stopped early, the best weights go back (restore_best)."""
        if not self.on or not self.stopped:
            return
        if self.config.restore_best and self.best_state is not None:
            model.load_state_dict(self.best_state)
        plan, c = self.plan, self.config
        restored = (f"the weights of epoch {self.best_epoch} restored" if c.restore_best
                    else "the last epoch's weights kept")
        nxt = (f"stage '{next_stage.name}' starts at its epoch {next_stage.first_epoch}"
               if next_stage is not None else "the run ends")
        line = (f"early stopping: stage '{plan.name}' stopped after epoch {self.epoch} "
                f"(planned {plan.first_epoch}-{plan.last_epoch}): {c.monitor} did not improve "
                f"on {self.best:.4f} (epoch {self.ref_epoch}) by more than {c.min_delta:g} for "
                f"{c.patience} epoch{'s' if c.patience != 1 else ''}; {restored}; {nxt}")
        log.info(line)
        self.tracker.log_text(f"early_stopping/{plan.name}", line, self.epoch)
        self.best_state = None

    def _record(self) -> None:
        plan, c = self.plan, self.config
        entry = {"stage": plan.name, "stage_index": plan.index, "epoch": self.epoch,
                 "planned_last_epoch": plan.last_epoch, "monitor": c.monitor,
                 "best": self._best_value(), "best_epoch": self.best_epoch,
                 "patience": c.patience,
                 "min_delta": c.min_delta, "restored": c.restore_best}
        stops = [s for s in self.tracker.extra.get(RECORD_KEY, [])
                 if s["stage_index"] != plan.index]
        self.tracker.extra[RECORD_KEY] = sorted([*stops, entry], key=lambda s: s["epoch"])
