"""Penalties added to the training loss (``trainer.regularize``).

``l2sp`` (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with
Convolutional Networks"): ``alpha/2 * ||w - w0||^2`` over the backbone's trainable weights,
where ``w0`` are the backbone's weights when the run started (the pretrained ones, then
``backbone.init``), plus ``beta/2 * ||w||^2`` over the new head's trainable weights. Frozen
weights add nothing (they do not move). It takes the place of weight decay.

``w0`` is a frozen copy taken when the model is built, before a resume loads its checkpoint: a
resumed run rebuilds the same starting weights (same source, same seed), and the checkpoint
keeps their fingerprint (:meth:`L2SP.fingerprint`), which a resume checks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from transferlab.config.schema import RegularizeConfig
from transferlab.errors import UserError


class L2SP:
    """Calling it gives the penalty (a scalar tensor, float32) for the current weights."""

    def __init__(self, model: nn.Module, alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta
        self.backbone = list(model.backbone.parameters())
        self.start = [p.detach().clone() for p in self.backbone]  # w0, never trained
        self.head = list(model.head.parameters())
        self._fingerprint = float(sum(float(w0.double().pow(2).sum()) for w0 in self.start))

    @classmethod
    def of(cls, cfg: RegularizeConfig, model: nn.Module) -> L2SP | None:
        """The run's penalty (None for ``name=none``); ``model`` holds its starting weights."""
        if cfg.name == "none":
            return None
        return cls(model, cfg.alpha, cfg.beta)

    def __call__(self) -> torch.Tensor:
        device = (self.backbone or self.head)[0].device
        total = torch.zeros((), device=device)
        if self.alpha:
            pulls = []
            for i, (w, w0) in enumerate(zip(self.backbone, self.start, strict=True)):
                if not w.requires_grad:
                    continue
                if w0.device != w.device:
                    w0 = self.start[i] = w0.to(w.device)
                pulls.append((w.float() - w0.float()).pow(2).sum())
            if pulls:
                total = total + self.alpha / 2 * torch.stack(pulls).sum()
        if self.beta:
            decays = [w.float().pow(2).sum() for w in self.head if w.requires_grad]
            if decays:
                total = total + self.beta / 2 * torch.stack(decays).sum()
        return total

    def fingerprint(self) -> float:
        """The squared norm of ``w0``: a checkpoint keeps it; a resume compares."""
        return self._fingerprint

    def check_resume(self, saved: float | None) -> None:
        """A resumed run's ``w0`` must be the one the run started from."""
        if saved is None:
            return
        now = self.fingerprint()
        if not math.isclose(now, saved, rel_tol=1e-6, abs_tol=1e-9):
            raise UserError("trainer.regularize.name=l2sp: the backbone's starting weights "
                            f"differ from the ones this run started from (squared norm {now:.6g} "
                            f"vs {saved:.6g}): the pretrained or backbone.init weights changed; "
                            "start a new run")
