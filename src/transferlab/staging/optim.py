"""Optimizers over a stage's parameter groups, with weight decay kept off norms and biases."""

from __future__ import annotations

import torch
from torch import nn

from transferlab.config.schema import (
    AdamConfig,
    AdamWConfig,
    OptimizerConfig,
    RMSpropConfig,
    SGDConfig,
)
from transferlab.registry import OPTIMIZERS
from transferlab.staging.policy import StagePlan


def torch_param_groups(model: nn.Module, plan: StagePlan, cfg: OptimizerConfig) -> list[dict]:
    """One torch param group per (stage group, decay or not); each carries its group ``name``.

    Weight decay skips 1-d parameters (norm weights, biases) unless
    ``optimizer.decay_norm_and_bias`` is set.
    """
    params = dict(model.named_parameters())
    out = []
    for group in plan.groups:
        decay, no_decay = [], []
        for n in group.param_names:
            p = params[n]
            (decay if cfg.decay_norm_and_bias or p.ndim > 1 else no_decay).append(p)
        for plist, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if plist:
                out.append({"params": plist, "lr": group.lr, "initial_lr": group.lr,
                            "weight_decay": wd, "name": group.name})
    return out


def _adam(cfg: AdamConfig, groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _adamw(cfg: AdamWConfig, groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _sgd(cfg: SGDConfig, groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _rmsprop(cfg: RMSpropConfig, groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                               momentum=cfg.momentum)


def build_optimizer(cfg: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over torch param groups (each with its lr and weight decay)."""
    return OPTIMIZERS.builder(cfg.name)(cfg, groups)


def stage_optimizer(model: nn.Module, plan: StagePlan, cfg: OptimizerConfig,
                    previous: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
    """The optimizer for a stage. Unless the stage resets it, the state (e.g. Adam moments) of
    parameters that also trained in the previous stage carries over; newly unfrozen
    parameters start fresh in their own groups."""
    optimizer = build_optimizer(cfg, torch_param_groups(model, plan, cfg))
    if previous is not None and not plan.spec.reset_optimizer:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in previous.state:
                    optimizer.state[p] = previous.state[p]
    return optimizer
