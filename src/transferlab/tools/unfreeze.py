"""Which blocks to unfreeze: the relative gradient norm per block (Auto-RGN, Lee et al. 2022,
"Surgical fine-tuning"), measured on a few batches of training images.

A linear head is first fitted on the backbone's cached pooled features (so that the
gradients are those of a sensible classifier, not of a random one); then the loss of the
backbone + that head on ``batches`` batches of training images is back-propagated once per
batch, and each block gets ``||grad|| / ||weights||`` over its parameters (gradients summed over
the batches, averaged per batch). Blocks with a large ratio are the ones fine-tuning would
change most relative to their size: Auto-RGN gives them the largest learning rates.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferlab.backbones import Backbone


def fit_linear_head(features: np.ndarray, labels: np.ndarray, steps: int = 100) -> nn.Linear:
    """A linear classifier on the pooled features: cross-entropy with a small L2 penalty,
    fitted by L-BFGS."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    head = nn.Linear(x.shape[1], int(y.max()) + 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small problem: more threads only contend
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return head


def relative_grad_norms(backbone: Backbone, head: nn.Linear, dataset: Dataset,
                        batches: int = 2, batch_size: int = 16,
                        device: torch.device | None = None) -> list[float]:
    """Per block of ``backbone`` (input to output): ||grad|| / ||weights|| of the loss of
    backbone + global average pooling + ``head`` on the first ``batches`` batches of
    ``dataset`` (the model in eval mode: BatchNorm statistics as the pretrained ones)."""
    device = device or torch.device("cpu")
    module = backbone.module.to(device).eval()
    head = head.to(device).eval()
    params = dict(module.named_parameters())
    wanted = {n: p.requires_grad for n, p in params.items()}
    seen = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            out = module(x.to(device))
            pooled = out.mean(dim=(2, 3)) if out.ndim == 4 else out
            loss = nn.functional.cross_entropy(head(pooled), torch.as_tensor(y).to(device))
            loss.backward()
            seen += 1
            if seen == batches:
                break
        return [_ratio([p for n, p in params.items() if block.owns(n)], seen)
                for block in backbone.blocks]
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(wanted[n])


def _ratio(owned: list[nn.Parameter], batches: int) -> float:
    """||grad|| / ||weights|| over ``owned``, the gradient averaged over ``batches``."""
    if not owned or batches == 0:
        return 0.0
    zero = torch.zeros(())
    grad = float(torch.sqrt(sum((p.grad.pow(2).sum() for p in owned if p.grad is not None),
                                zero)))
    norm = float(torch.sqrt(sum((p.detach().pow(2).sum() for p in owned), zero)))
    return grad / batches / max(norm, 1e-12)
