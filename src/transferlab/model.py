"""The classifier: a backbone (the frozen-prefix candidate) followed by a new head."""

from __future__ import annotations

import torch
from torch import nn


class TransferModel(nn.Module):
    """``head(backbone(x))``; parameter names start with ``backbone.`` or ``head.``.

    ``adapters``: the LoRA adapters in the backbone (``freeze=lora``, :mod:`transferlab.lora`),
    or None."""

    adapters = None  # transferlab.lora.Adapters, set by run.build.build_classifier

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
