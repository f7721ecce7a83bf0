"""Rank backbones (and their blocks) for a data set before training any of them.

    transferlab-rank dataset=hymenoptera                      # the offline zoo, LogME, blocks
    transferlab-rank dataset=hymenoptera backbones=efficientnet_lite0,resnet18 scores=logme,leep

Each candidate backbone is built as a run builds it (``backbone=<name>`` on top of the run's
overrides). Its pooled features of the training split (eval preprocessing; the val split is
never read) come from the feature cache: the entries ``transferlab-features``, ``task=logreg``
and a frozen-backbone run read for that split, so a second call, or a later sweep, starts warm.
Each chosen score of :mod:`transferlab.tools.scores` is computed on them. ``blocks``: the
globally pooled outputs at every block boundary, from one pass over the training images, are
scored too (one store entry of their own). A backbone that cannot be built (an online one
without network) becomes one row saying why; the rest still comes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferlab.backbones import Backbone
from transferlab.backbones.segments import Segment, boundary_points, sequential_view
from transferlab.config import AugmentConfig, RunConfig
from transferlab.data import build_splits, eval_batch_size, loader_workers, worker_context
from transferlab.errors import UserError
from transferlab.feature_cache import FeatureCache
from transferlab.feature_cache.identity import dataset_identity, dataset_labels, tensors_hash
from transferlab.feature_cache.store import FORMAT, DiskStore, LockUnavailable
from transferlab.infra.runtime import Precision, pick_device
from transferlab.tools.backbone_lookup import backbone_config
from transferlab.tools.scores import RANK_SCORES
from transferlab.tools.unfreeze import fit_linear_head, relative_grad_norms

log = logging.getLogger("transferlab")

@dataclass
class Row:
    """One candidate: a whole backbone (``block`` None) or its features after one block."""

    backbone: str
    block: str | None = None
    block_index: int | None = None
    dim: int | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    rgn: float | None = None  # a block's relative gradient norm (Auto-RGN), when measured

    @property
    def label(self) -> str:
        return self.backbone if self.block is None else f"{self.backbone} @ {self.block}"


@dataclass
class Features:
    """What the scores of one candidate read: its features, labels, and (a whole ImageNet
    backbone only) the source model's class probabilities."""

    features: np.ndarray
    labels: np.ndarray
    probs: np.ndarray | None = None


def score_row(row: Row, data: Features, scores: list[str]) -> Row:
    """Every chosen score of the candidate; None where it does not apply (LEEP and NCE need
    the source model's ImageNet probabilities: whole pretrained ImageNet backbones only)."""
    from threadpoolctl import threadpool_limits

    row.dim = int(data.features.shape[1])
    with threadpool_limits(1, "blas"):  # these matrices are small: threads only contend
        for name in scores:
            entry = RANK_SCORES[name]
            inputs = data.probs if entry.reads_probs else data.features
            row.scores[name] = None if inputs is None else entry.fn(inputs, data.labels)
    return row


def source_probs(backbone: Backbone, pooled: np.ndarray) -> np.ndarray | None:
    """The original ImageNet classifier's probabilities from the pooled features, or None
    without an ImageNet head, or when that head reads more than the average of the feature
    map (VGG's 7x7 classifier): checked on a random map of the backbone's feature shape."""
    if backbone.imagenet_head is None:
        return None
    head = backbone.imagenet_head.to("cpu").eval()
    x = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32))
    with torch.no_grad():
        if len(backbone.feature_shape) == 3:
            probe = torch.randn(2, *backbone.feature_shape, generator=torch.Generator()
                                .manual_seed(0))
            averaged = probe.mean(dim=(2, 3), keepdim=True)
            if not torch.allclose(head(probe), head(averaged), rtol=1e-4, atol=1e-4):
                return None
            x = x[:, :, None, None]
        return head(x).double().softmax(dim=1).numpy()


# -- block boundaries ----------------------------------------------------------------------------
def _pooled_at(segments: list[Segment], cuts: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    """The chain run on ``x`` up to the last cut: the globally pooled output at each cut."""
    pooled, stops = [], set(cuts)
    for i, seg in enumerate(segments[:max(cuts)], start=1):
        x = seg.fn(x)
        if i in stops:
            pooled.append(x.float().mean(dim=(2, 3)) if x.ndim == 4 else x.float())
    return pooled


def _block_pass(segments: list[Segment], cuts: list[int], dataset: Dataset, run: RunConfig,
                device: torch.device, into: tuple[np.ndarray, np.ndarray]) -> None:
    """One forward pass over ``dataset``: the pooled outputs at ``cuts``, side by side,
    written into ``into`` (features, labels)."""
    features, labels = into
    workers = loader_workers(run.trainer)
    loader = DataLoader(dataset, batch_size=eval_batch_size(run.trainer), shuffle=False,
                        num_workers=workers,
                        multiprocessing_context=worker_context() if workers else None)
    start = 0
    fmt = torch.channels_last if run.trainer.channels_last else torch.contiguous_format
    with torch.no_grad(), Precision(device, run.trainer.amp).autocast():
        for x, y in loader:
            n = len(y)
            pooled = _pooled_at(segments, cuts, x.to(device, memory_format=fmt))
            features[start:start + n] = torch.cat(pooled, dim=1).cpu().numpy()
            labels[start:start + n] = np.asarray(y)
            start += n


def block_features(backbone: Backbone, dataset: Dataset, image_size: int, run: RunConfig,
                   device: torch.device, store: DiskStore | None
                   ) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """(block index, block name, pooled features (N, C), labels) after each block, from the
    store's entry of this backbone, data and size, or one pass written into it; empty when
    the backbone has no sequential view (it is only used whole)."""
    module = backbone.module.to(device).eval()
    segments = sequential_view(backbone, image_size)
    points = boundary_points(backbone, segments) if segments else []
    if not points:
        return []
    cuts = [p[0] for p in points]
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        widths = [int(t.shape[1]) for t in _pooled_at(segments, cuts, probe)]
    shape, dtype = (len(dataset), sum(widths)), run.trainer.feature_cache.dtype
    key_parts = {"format": FORMAT, "kind": "rank block boundaries", "backbone": backbone.name,
                 "weights": tensors_hash([("backbone", module)]),
                 "data": dataset_identity(dataset), "size": image_size, "dtype": dtype,
                 "cuts": cuts, "torch": torch.__version__,
                 "signer": store.signer if store else None}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:40]

    def fill(features: np.ndarray, labels: np.ndarray) -> None:
        _block_pass(segments, cuts, dataset, run, device, (features, labels))

    features, labels = _stored(store, key, key_parts, shape, dataset, fill)
    edges = np.cumsum([0, *widths])
    return [(j, name, features[:, edges[i]:edges[i + 1]], labels)
            for i, (_, j, name) in enumerate(points)]


def _stored(store: DiskStore | None, key: str, key_parts: dict, shape: tuple[int, int],
            dataset: Dataset, fill) -> tuple[np.ndarray, np.ndarray]:
    """The store's entry ``key`` (filled under its lock when absent or bad), or, without a
    usable store, the arrays filled in memory."""
    if store is not None and key_parts["data"] is not None:
        expected = dataset_labels(dataset)
        try:
            entry = store.get(key, expected)
            if entry is None:
                with store.lock(key):
                    entry = store.get(key, expected) or store.put(
                        key, shape, key_parts["dtype"], {"key": key_parts}, fill)
            return np.asarray(entry.features, dtype=np.float64), np.asarray(entry.labels)
        except LockUnavailable as exc:
            log.warning("feature cache: %s: the block features are kept in memory", exc)
    features, labels = np.zeros(shape, dtype=np.float32), np.zeros(shape[0], np.int64)
    fill(features, labels)
    return features, labels


# -- one candidate, the whole ranking ---------------------------------------------------------
def feature_cache(run: RunConfig, backbone: Backbone, device: torch.device) -> FeatureCache:
    """The cache :func:`~transferlab.feature_cache.extract_splits` makes for this
    backbone (the same entries as ``transferlab-features`` and ``task=logreg``)."""
    trainer = run.trainer
    return FeatureCache(trainer.feature_cache, device, Precision(device, trainer.amp),
                        trainer.channels_last and len(backbone.feature_shape) == 3,
                        eval_batch_size(trainer), loader_workers(trainer))


def rank_backbone(run: RunConfig, name: str, scores: list[str], blocks: bool,
                  device: torch.device, rgn_batches: int = 0) -> list[Row]:
    """The rows of the backbone ``name`` (a preset, or a torchvision / timm model name):
    :func:`rank_run_backbone` of ``run`` with that backbone."""
    try:
        run = dataclasses.replace(run, backbone=backbone_config(name, None))
    except UserError as exc:
        return [Row(name, error=str(exc))]
    return rank_run_backbone(run, name, scores, blocks, device, rgn_batches)


def rank_run_backbone(run: RunConfig, name: str, scores: list[str], blocks: bool,
                      device: torch.device, rgn_batches: int = 0) -> list[Row]:
    """The rows of ``run``'s backbone as its config builds it (``backbone.cut``,
    ``backbone.init``, ``pretrained=false``...), named ``name``: whole, then (``blocks``) after
    each block, with their relative gradient norm on ``rgn_batches`` batches (0: not
    measured); one row with the error when it cannot be built or its features cannot be
    made."""
    from transferlab.run.build import build_backbone_of

    started = time.perf_counter()
    try:
        backbone, _, size, _ = build_backbone_of(run)
        splits = build_splits(run.dataset, AugmentConfig(), backbone.input, size)
        cache = feature_cache(run, backbone, device)
        x, y = cache.pooled_features(backbone, size, {"train": splits.train},
                                     f"rank {name}")["train"]
        rows = [score_row(Row(name), Features(x, y, source_probs(backbone, x)), scores)]
        if blocks:
            rgn = relative_grad_norms(backbone, fit_linear_head(x, y), splits.train,
                                      rgn_batches, device=device) if rgn_batches else None
            boundaries = block_features(backbone, splits.train, size, run, cache.device,
                                        cache.store)
            if not boundaries:
                log.warning("%s cannot be cut at its block boundaries (no sequential view): "
                            "it is scored whole only", name)
            for j, block, fx, fy in boundaries:
                row = score_row(Row(name, block, j), Features(fx, fy), scores)
                row.rgn = rgn[j] if rgn else None
                rows.append(row)
    except UserError as exc:
        return [Row(name, error=str(exc), seconds=time.perf_counter() - started)]
    rows[0].seconds = time.perf_counter() - started
    return rows


def rank(run: RunConfig, backbones: list[str], scores: list[str], blocks: bool,
         rgn_batches: int = 0) -> list[Row]:
    """Every candidate's rows, in the order given (the report ranks them)."""
    unknown = [s for s in scores if s not in RANK_SCORES]
    if unknown:
        from transferlab.errors import did_you_mean

        raise UserError(f"unknown score {unknown[0]!r}{did_you_mean(unknown[0], RANK_SCORES)}; "
                        f"choose from {', '.join(RANK_SCORES)}")
    device = pick_device(run.trainer.device)
    rows: list[Row] = []
    for name in backbones:
        rows += rank_backbone(run, name, scores, blocks, device, rgn_batches)
    return rows
