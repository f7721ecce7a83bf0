"""Third-party modules imported without what they import for features transferlab does not
use (start-up time is a feature: a run's process spends most of its first seconds importing)."""

from __future__ import annotations

import sys
from types import ModuleType


def import_timm() -> ModuleType:
    """The ``timm`` module. Its first import hides wandb from it: ``timm.utils.summary`` imports
    wandb whenever it is installed, for a ``log_wandb`` option of timm's training script that
    transferlab never uses, and that import alone was 2.3 s of the default run's 8 s (Python
    3.11, wandb 0.30, 2 CPU cores). wandb stays importable as before: transferlab's own logger
    (``trainer.loggers=wandb``) and the user's code import it in full. Call it before any
    ``from timm... import``: the first import of any part of timm imports all of it."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # type: ignore[assignment]  (import wandb: ImportError)
    try:
        import timm
    finally:
        if hide and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    return timm
