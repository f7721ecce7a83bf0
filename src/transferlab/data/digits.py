"""scikit-learn's handwritten digits (8x8, 10 classes) as 64x64 RGB images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset
from torchvision import tv_tensors

SIDE = 64
CLASSES = [str(d) for d in range(10)]


def digits_images() -> tuple[torch.Tensor, list[int]]:
    """All 1797 digits as uint8 (N, 3, 64, 64) images (bilinear upsampling) and their labels."""
    bunch = load_digits()
    small = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, [int(t) for t in bunch.target]


class TensorImageDataset(Dataset):
    """In-memory uint8 images with labels, passed through ``transform``."""

    def __init__(self, images: torch.Tensor, labels: list[int], transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = tv_tensors.Image(self.images[i])
        return (self.transform(image) if self.transform else image), self.labels[i]
