"""What a cached entry depends on, as hashes: the frozen prefix's tensors and a split's images.

A changed input gives a new key, never a stale feature: weights and buffers are hashed by
value; image files by path and content (``content=True``, the default: every file's bytes
are read) or by path, size and modification time (``content=False``: a file replaced by
another of the same size with its modification time kept goes unnoticed); in-memory images
by value; torchvision datasets by class, settings (root, split, ...), length and the items
used; a dataset with a ``cache_identity(content)`` method (shards, Hugging Face datasets)
by what it returns. The transform (size, resize, crop, interpolation, mean/std) is part of
every split's identity. Paths are hashed as the file system's bytes (``os.fsencode``): any
file name works.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np
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


def file_identity(path, content: bool = True) -> bytes:
    """One image file: its absolute path (the file system's bytes) and its content's SHA-256
    (``content``) or its size and modification time (ns)."""
    name = os.fsencode(os.path.abspath(path))
    if content:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return name + f"|{digest}".encode()
    st = os.stat(path)
    return name + f"|{st.st_size}|{st.st_mtime_ns}".encode()


def dataset_identity(dataset, content: bool = True) -> str | None:
    """A hash of everything the split's preprocessed images depend on, or None for a dataset
    type this module does not know (such a split is not cached). ``content``: image files are
    known by their bytes (else by size and modification time: cheaper, blind to a file
    replaced in place with its time kept)."""
    h = hashlib.sha256()
    h.update(f"transform {getattr(dataset, 'transform', None)!r}\n".encode())
    if hasattr(dataset, "cache_identity"):  # a dataset that knows its own (shards, hf)
        h.update(f"{type(dataset).__qualname__} {dataset.cache_identity(content)}\n".encode())
    elif isinstance(dataset, ImageFileDataset):
        h.update(b"files by content\n" if content else b"files by stat\n")
        for path, label in dataset.samples:
            h.update(file_identity(path, content) + f"|{label}\n".encode())
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


def dataset_labels(dataset) -> np.ndarray | None:
    """The split's labels in order (int64), read without decoding an image; None for a
    dataset type :func:`dataset_identity` does not know."""
    if hasattr(dataset, "cache_identity"):
        labels = list(dataset.labels)
    elif isinstance(dataset, ImageFileDataset):
        labels = [label for _, label in dataset.samples]
    elif isinstance(dataset, TensorImageDataset):
        labels = list(dataset.labels)
    elif isinstance(dataset, IndexedImages):
        labels = [dataset.label_of(source, index) for source, index in dataset.items]
    else:
        return None
    return np.asarray([int(v) for v in labels], dtype=np.int64)
