"""An exponential moving average of the model's weights (``trainer.ema``).

After every optimizer step, ``ema = decay * ema + (1 - decay) * w`` for every parameter and
floating-point buffer (BatchNorm statistics follow), starting from ``ema = w`` when the run
starts; integer buffers (BatchNorm's batch counter) are copied. The averaging is timm's
``ModelEmaV3``: it starts from a copy of the model (the formula's ``ema0 = w0``, where
``torch.optim.swa_utils.AveragedModel`` makes its first update a plain copy), copies integer
buffers instead of rounding a float average into them, and has the optional warm-up
(``trainer.ema.warmup``) that short fine-tuning runs need: at decay 0.999 an average over a few
hundred steps would still mostly be the starting weights.

**Stages.** The average goes on across stage boundaries (it does not restart). At each stage
start, the parameters the stage does not train and the buffers of the modules it keeps in eval
mode take the model's values: they do not change during the stage, so their average is
exactly the model's. That is a no-op for a part that never trained (the frozen backbone of
``two_stage`` or ``gradual``); for a stage that freezes what an earlier stage trained, it makes
the frozen part the very weights the stage's inputs are computed with.

**Evaluation.** The average is evaluated by swapping its values into the run's model for the
pass and back afterwards, on the very inputs and through the very modules the raw model is
evaluated with: a stage on cached features evaluates the average's trained part on the
cached outputs of the frozen prefix, which (above) is the raw model's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from transferlab.config.schema import EmaConfig
from transferlab.engine.best import epoch_rank
from transferlab.infra.imports import import_timm


class WeightsEma:
    """The average of one run's model (``built.model``: whatever module a stage trains, a
    model after a feature-cache cut included, shares its parameters)."""

    def __init__(self, cfg: EmaConfig, model: nn.Module, state: dict[str, Any] | None = None):
        import_timm()
        from timm.utils.model_ema import ModelEmaV3

        self.cfg, self.model = cfg, model
        self.average = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup)
        self.updates = 0
        if state is not None:
            self.average.module.load_state_dict(state["model"])
            self.updates = int(state["updates"])

    @classmethod
    def of(cls, cfg: EmaConfig, model: nn.Module | None,
           state: dict[str, Any] | None = None) -> WeightsEma | None:
        """The run's average, or None when ``trainer.ema.decay`` is null."""
        if cfg.decay is None or model is None:
            return None
        return cls(cfg, model, state)

    @property
    def module(self) -> nn.Module:
        return self.average.module

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step. Without warm-up the decay is ``trainer.ema.decay``; with it,
        ``min(decay, 1 - (1 + t)^(-2/3))`` at the t-th update (the first one copies)."""
        self.updates += 1
        self.average.update(self.model, step=self.updates if self.cfg.warmup else None)

    @torch.no_grad()
    def start_stage(self) -> None:
        """At a stage start (requires_grad and modes set): what the stage keeps fixed takes
        the model's values."""
        for p_avg, p in zip(self.module.parameters(), self.model.parameters(), strict=True):
            if not p.requires_grad:
                p_avg.copy_(p)
        for m_avg, m in zip(self.module.modules(), self.model.modules(), strict=True):
            if not m.training:
                for b_avg, b in zip(m_avg.buffers(recurse=False), m.buffers(recurse=False),
                                    strict=True):
                    b_avg.copy_(b)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the average's values inside the block, its own again after."""
        own = [t.detach() for t in self.model.state_dict().values()]
        avg = [t.detach() for t in self.module.state_dict().values()]
        saved = [t.clone() for t in own]
        with torch.no_grad():
            for mine, theirs in zip(own, avg, strict=True):
                mine.copy_(theirs)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for mine, kept in zip(own, saved, strict=True):
                    mine.copy_(kept)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (``ckpt["ema"]``): the averaged state dict (the model's
        keys), the number of updates and the decay."""
        return {"model": self.module.state_dict(), "updates": self.updates,
                "decay": self.cfg.decay, "warmup": self.cfg.warmup}


def ema_columns(record: dict) -> str:
    """The console line's EMA column (empty without one)."""
    if "val_loss_ema" not in record:
        return ""
    acc = record.get("val_acc_ema")
    return (f" | ema val loss {record['val_loss_ema']:.4f}"
            + (f" acc {acc:.4f}" if acc is not None else ""))


def ema_fields(stats, record: dict) -> dict:
    """An epoch record's EMA fields (``val_loss_ema``, and ``val_acc_ema`` where ``record``
    has an accuracy) from the EMA's val ``stats`` (None: no EMA, no fields)."""
    if stats is None:
        return {}
    return {"val_loss_ema": stats.loss, **({"val_acc_ema": stats.acc} if "val_acc" in record
                                           else {})}


def best_ema(history: list[dict]) -> dict | None:
    """The epoch whose EMA weights scored best on val (:mod:`~transferlab.engine.best`'s
    rule: acc, then lower loss, the earlier of equals), or None."""
    rows = [r for r in history if r.get("val_loss_ema") is not None]
    if not rows:
        return None
    top = max(rows, key=lambda r: epoch_rank({"val_acc": r.get("val_acc_ema"),
                                              "val_loss": r["val_loss_ema"]}))
    return {k: top[k] for k in ("epoch", "val_acc_ema", "val_loss_ema") if k in top}
