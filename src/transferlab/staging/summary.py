"""The per-stage trainable table (what Keras' ``model.summary()`` shows, plus LR and BN mode)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from transferlab.backbones import Backbone
from transferlab.staging.policy import StagePlan, eval_batchnorms, is_batchnorm


@dataclass
class Row:
    part: str
    params: int
    trainable: int
    bn: str
    lr: str


def _fmt_lrs(lrs: set[float]) -> str:
    return ", ".join(f"{lr:.3g}" for lr in sorted(lrs, reverse=True)) if lrs else "-"


def stage_rows(model: nn.Module, backbone: Backbone, plan: StagePlan) -> list[Row]:
    """One row per backbone block, then the head; counts follow ``requires_grad``."""
    lr_of = {n: g.lr for g in plan.groups for n in g.param_names}
    frozen_bn = set(eval_batchnorms(model, plan.spec.bn))
    bn_names = [n for n, m in model.named_modules() if is_batchnorm(m)]
    params = dict(model.named_parameters())
    parts: list[tuple[str, list[str], list[str]]] = []
    for block in backbone.blocks:
        names = [n for n in params if n.startswith("backbone.") and block.owns(n[9:])]
        bns = [n for n in bn_names if n.startswith("backbone.") and block.owns(n[9:])]
        parts.append((block.name, names, bns))
    parts.append(("head", [n for n in params if n.startswith("head.")],
                  [n for n in bn_names if n.startswith("head.")]))
    rows = []
    for part, names, bns in parts:
        if bns:
            n_frozen = sum(b in frozen_bn for b in bns)
            bn = "eval" if n_frozen == len(bns) else "train" if n_frozen == 0 else "mixed"
        else:
            bn = "-"
        rows.append(Row(
            part=part,
            params=sum(params[n].numel() for n in names),
            trainable=sum(params[n].numel() for n in names if params[n].requires_grad),
            bn=bn,
            lr=_fmt_lrs({lr_of[n] for n in names if n in lr_of}),
        ))
    return rows


def stage_table(model: nn.Module, backbone: Backbone, plan: StagePlan) -> str:
    """A fixed-width table of the stage's blocks, then trainable / non-trainable totals."""
    rows = stage_rows(model, backbone, plan)
    width = max(len("part"), *(len(r.part) for r in rows))
    lines = [f"stage {plan.index + 1} '{plan.name}' (epochs {plan.first_epoch}-{plan.last_epoch}"
             f", bn {plan.spec.bn})",
             f"{'part':<{width}}  {'params':>11}  {'trainable':>11}  {'state':<9}  {'bn':<6}  lr",
             "-" * (width + 55)]
    for r in rows:
        state = "frozen" if r.trainable == 0 else "trainable" if r.trainable == r.params \
            else "partial"
        lines.append(f"{r.part:<{width}}  {r.params:>11,}  {r.trainable:>11,}  {state:<9}  "
                     f"{r.bn:<6}  {r.lr}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines += ["-" * (width + 55),
              f"total params: {total:,}   trainable: {trainable:,}   "
              f"non-trainable: {total - trainable:,}"]
    adapters = getattr(model, "adapters", None)  # freeze=lora: counted in the blocks' rows
    if adapters is not None:
        lines.append(adapters.describe())
    return "\n".join(lines)
