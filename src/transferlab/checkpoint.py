"""Checkpoints: enough to resume a run mid-policy (model, optimizer, stage, RNG, history)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.runtime import rng_state


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, stage_index: int, stage_name: str, config: dict,
                    history: list[dict], best: dict | None, classes: list[str]) -> None:
    """Write atomically (a crash mid-write never leaves a truncated ``last.pt``)."""
    payload = {
        "format": "transferlab-checkpoint/1",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "stage": {"index": stage_index, "name": stage_name},
        "config": config,
        "classes": classes,
        "history": history,
        "best": best,
        "rng": rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a transferlab checkpoint safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def save_epoch_checkpoints(run_dir: Path, improved: bool, **state: Any) -> None:
    """``checkpoints/last.pt`` after every epoch, ``best.pt`` too when the epoch improved."""
    save_checkpoint(Path(run_dir) / "checkpoints" / "last.pt", **state)
    if improved:
        save_checkpoint(Path(run_dir) / "checkpoints" / "best.pt", **state)
