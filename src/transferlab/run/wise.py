"""WiSE-FT's two ends (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the
weights a run starts fine-tuning from, and the interpolation between them and its final ones.

A classification run whose freeze policy has a stage that trains backbone parameters writes
``wise_start.pt`` when the first such stage starts (:class:`WiseStart`): the model
as it is then, the pretrained backbone and the head that earlier stages trained (the probed
head of ``freeze=lp_ft``; a freshly initialised head where the first stage already trains the
backbone, e.g. ``freeze=none``). Once per run; a linear probe writes none. Where the run's
checkpoints leave out the tensors still equal to the pretrained weights
(``trainer.checkpoint_weights=changed``) the file does too, so it costs about the head.

:func:`interpolate` mixes two state dicts: every floating-point tensor (weights and BatchNorm's
running statistics alike) as ``(1 - alpha) * start + alpha * final``; every other tensor
(``num_batches_tracked``) is the final one's. ``alpha=0`` gives the start weights and
``alpha=1`` the final ones, bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.engine.hooks import Hook
from transferlab.errors import UserError
from transferlab.infra.checkpoint import load_checkpoint, write_sealed
from transferlab.infra.delta import is_delta, split
from transferlab.staging.policy import NAMED_SELECTORS

log = logging.getLogger("transferlab")

START_FILE = "wise_start.pt"
FORMAT = "transferlab-wise-start/1"


def start_path(run_dir: Path) -> Path:
    """Beside ``checkpoints/``, not in it: it is no checkpoint to resume or evaluate from."""
    return Path(run_dir) / START_FILE


def trains_backbone(plan) -> bool:
    """Whether a stage plan trains any backbone parameter (the ``backbone`` selector's)."""
    picks = NAMED_SELECTORS["backbone"].picks
    return any(picks(name) for name in plan.trainable())


class WiseStart(Hook):
    """Writes ``wise_start.pt`` when the first stage with epochs that trains
    backbone parameters starts at its first epoch (rank 0); a resume that goes on within or
    after that stage finds the file written."""

    def __init__(self, built, run_dir: Path):
        self.built, self.path = built, start_path(run_dir)

    def on_stage_start(self, loop) -> None:
        first = next((p for p in loop.plans if p.spec.epochs > 0 and trains_backbone(p)), None)
        if first is None or loop.plan.index != first.index or not loop.fresh:
            return
        if self.built.world.main:
            save_start(self.path, loop.model, self.built, loop.plan)


def save_start(path: Path, model: nn.Module, built, plan) -> None:
    """The model's weights now, written atomically and sealed like a checkpoint, leaving out
    the tensors equal to the run's pretrained ones where its checkpoints do."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"format": FORMAT, "model": state, "stage": plan.name,
                               "epoch": plan.first_epoch - 1}
    if built.source is not None:
        omitted: dict[str, list[str]] = {}
        payload["model"] = split(state, built.source.tensors, omitted)
        if omitted:
            payload["source"] = built.source.record(omitted)
    write_sealed(path, payload)
    log.info("WiSE-FT start weights (before stage %s, epoch %d): %s", plan.name,
             plan.first_epoch, path)


def load_start(run_dir: Path | None, config: Any, num_classes: int,
               dataset_overrides: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(the model with a run's start weights, in eval mode on the CPU, and what the file
    says of them: its path, stage and epoch). ``config``: the run's saved config (from any of
    its checkpoints). A run without the file is a one-line error saying why."""
    from transferlab.run.saved import restore_model, saved_run_config

    if run_dir is None:
        raise UserError("wise= needs the run directory (its wise_start.pt): give "
                        "run=<run dir>, or a checkpoint inside <run dir>/checkpoints/")
    path = start_path(run_dir)
    if not path.is_file():
        raise UserError(f"wise=: {run_dir} has no {START_FILE}: a run writes it when "
                        "its first stage that trains the backbone starts; this one trained none "
                        "(a linear probe?) or was trained before transferlab recorded it")
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a {FORMAT} file")
    run = saved_run_config(config, dataset_overrides, pretrained=is_delta(ckpt))
    source = ckpt["source"] if is_delta(ckpt) else None
    model, _, _ = restore_model(run, ckpt["model"], num_classes, source, path)
    return model, {"file": str(path), "stage": ckpt.get("stage"), "epoch": ckpt.get("epoch")}


def interpolate(start: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * final`` for every floating-point tensor, the final
    tensor for every other one (integer buffers such as ``num_batches_tracked``)."""
    if set(start) != set(final):
        different = sorted(set(start) ^ set(final))
        shown = ", ".join(different[:3]) + (" ..." if len(different) > 3 else "")
        raise UserError(f"the start and final weights hold different tensors ({shown}): not the "
                        "same architecture")
    mixed = {}
    for key, last in final.items():
        first = start[key].to(last.device)
        if last.is_floating_point():
            mixed[key] = ((1.0 - alpha) * first + alpha * last).to(last.dtype)
        else:
            mixed[key] = last.clone()
    return mixed
