"""The runtime options every pass over a loader needs, in one object."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transferlab.infra.distributed import World
from transferlab.infra.runtime import Precision


@dataclass(frozen=True)
class EpochContext:
    """Where and how a pass runs: the device, the autocast precision (``trainer.amp``),
    channels-last images (``trainer.channels_last``, when the model's features are a map), a
    progress bar, else a progress line every ``progress_every`` seconds (0: none; off a
    terminal), and this process of the run (:class:`~transferlab.infra.distributed.World`)."""

    device: torch.device
    precision: Precision
    channels_last: bool = False
    progress: bool = False
    world: World = field(default_factory=World)
    progress_every: float = 0.0

    @classmethod
    def cpu(cls, amp: str = "off") -> EpochContext:
        """Full precision (or ``amp``) on the CPU, one process, no progress bar."""
        device = torch.device("cpu")
        return cls(device, Precision(device, amp))
