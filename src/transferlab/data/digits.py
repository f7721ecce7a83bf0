"""scikit-learn's handwritten digits (8x8, 10 classes) as 64x64 RGB images."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

SIDE = 64
CLASSES = [str(d) for d in range(10)]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) of values 0..16, labels): the data of scikit-learn's
    ``load_digits``, read from the file scikit-learn ships without importing scikit-learn
    (which, with SciPy, takes longer than the whole default run's training)."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(next(iter(folders or [""]))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def digits_images() -> tuple[torch.Tensor, list[int]]:
    """All 1797 digits as uint8 (N, 3, 64, 64) images (bilinear upsampling) and their labels."""
    digits, labels = load_digits()
    small = torch.tensor(digits, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, [int(t) for t in labels]


class TensorImageDataset(Dataset):
    """In-memory uint8 images with labels, passed through ``transform``."""

    def __init__(self, images: torch.Tensor, labels: list[int], transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = tv_tensors.Image(self.images[i])
        return (self.transform(image) if self.transform else image), self.labels[i]
