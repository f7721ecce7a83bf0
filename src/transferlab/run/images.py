"""Pictures of a run for TensorBoard: the training images as the model gets them (a grid
labelled by class) and an autoencoder's reconstructions."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import IterableDataset

from transferlab.run.record import RunTracker


def log_training_samples(tracker: RunTracker, splits, spec, n: int = 16) -> None:
    """A grid of training images as the model gets them (augmented), un-normalised, drawn
    from every class in turn and labelled with its class name, in TensorBoard
    (``data/train_samples``). Drawn on a forked RNG: training is unaffected."""
    dataset, labels = splits.train, splits.train_labels
    if len(dataset) == 0:
        return
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    with torch.random.fork_rng():
        if isinstance(dataset, IterableDataset):  # streamed: its first images, as read
            drawn = list(itertools.islice(iter(dataset), n))
            images, names = ([(x.float() * std + mean).clamp(0, 1) for x, _ in drawn],
                             [splits.classes[y] for _, y in drawn])
        else:
            picks = sample_indices(labels or [0] * len(dataset), n)
            images = [(dataset[i][0].float() * std + mean).clamp(0, 1) for i in picks]
            names = [splits.classes[labels[i]] if labels else "" for i in picks]
    tracker.log_images("data/train_samples", torch.stack(
        [_labelled(x, name) for x, name in zip(images, names, strict=True)]))


def sample_indices(labels: list[int], n: int) -> list[int]:
    """Up to ``n`` indices taking each class in turn (the first image of every class, then
    the second, ...)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    queues = [by_class[y] for y in sorted(by_class)]
    picks: list[int] = []
    depth = 0
    while len(picks) < n and any(depth < len(q) for q in queues):
        picks += [q[depth] for q in queues if depth < len(q)][:n - len(picks)]
        depth += 1
    return picks


def _labelled(image: torch.Tensor, text: str) -> torch.Tensor:
    """``image`` (3, H, W in [0, 1]) with ``text`` written in its top-left corner."""
    if not text:
        return image
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    pil: Image.Image = to_pil_image(image)
    draw = ImageDraw.Draw(pil)
    box = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return pil_to_tensor(pil).float() / 255.0




def reconstruction_grid(model: nn.Module, images: torch.Tensor, mean, std,
                        device: torch.device) -> torch.Tensor:
    """``images`` (normalised) above their reconstructions, un-normalised to [0, 1]."""
    model.eval()
    with torch.no_grad():
        recon = model(images.to(device)).float().cpu()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return torch.cat([images, recon]).mul(s).add(m).clamp(0, 1)
