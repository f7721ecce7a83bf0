"""What a cached entry depends on, as hashes: the frozen prefix's tensors and a split's images.

A changed input gives a new key, never a stale feature: weights and buffers are hashed by
value; image files by path, size and modification time (ns); in-memory images by value;
torchvision datasets by class, settings (root, split, ...), length and the items used. The
transform (size, resize, crop, interpolation, mean/std) is part of every split's identity.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import torch
from torch import nn

from transferlab.data.digits import TensorImageDataset
from transferlab.data.image_folder import ImageFileDataset, IndexedImages


def tensors_hash(modules: Iterable[tuple[str, nn.Module]]) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes) of ``modules``."""
    h = hashlib.sha256()
    for prefix, module in modules:
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _simple_attrs(obj) -> dict:
    """A torchvision dataset's settings: its plain-valued attributes (root, train, split, ...)."""
    out = {}
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_") or key in ("transform", "target_transform", "transforms"):
            continue
        if isinstance(value, str | int | float | bool | type(None)) or (
                isinstance(value, tuple) and all(isinstance(v, int | str) for v in value)):
            out[key] = value
    return out


def dataset_identity(dataset) -> str | None:
    """A hash of everything the split's preprocessed images depend on, or None for a dataset
    type this module does not know (such a split is not cached)."""
    h = hashlib.sha256()
    h.update(f"transform {getattr(dataset, 'transform', None)!r}\n".encode())
    if isinstance(dataset, ImageFileDataset):
        for path, label in dataset.samples:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    elif isinstance(dataset, TensorImageDataset):
        images = dataset.images.contiguous()
        h.update(f"tensor {images.dtype} {tuple(images.shape)}\n".encode())
        h.update(images.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(repr(list(dataset.labels)).encode())
    elif isinstance(dataset, IndexedImages):
        sources: dict[int, int] = {}
        for source, index in dataset.items:
            if id(source) not in sources:
                sources[id(source)] = len(sources)
                h.update(f"source {type(source).__module__}.{type(source).__qualname__} "
                         f"{len(source)} {_simple_attrs(source)}\n".encode())
            h.update(f"{sources[id(source)]}:{index}:{dataset.label_of(source, index)}\n"
                     .encode())
    else:
        return None
    return h.hexdigest()
