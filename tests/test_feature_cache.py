"""The frozen-prefix feature cache: same numbers as the uncached path, used only where valid,
a new key for any changed input, safe under concurrent and killed extractions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from transferlab.backbones import Backbone, Block, InputSpec, build_backbone, probe_features
from transferlab.backbones.segments import block_boundaries, sequential_view
from transferlab.config import (
    BackboneConfig,
    FeatureCacheConfig,
    FolderDatasetConfig,
    TorchvisionBackboneConfig,
)
from transferlab.config.schema import AugmentConfig
from transferlab.data import build_splits
from transferlab.feature_cache import FeatureCache, find_cut
from transferlab.feature_cache.identity import dataset_identity
from transferlab.feature_cache.store import DiskStore
from transferlab.heads import build_head
from transferlab.infra.runtime import Precision
from transferlab.model import TransferModel
from transferlab.run import train
from transferlab.staging.policy import apply_stage, plan_stages, set_train_mode

from .conftest import TINY

CPU = torch.device("cpu")
EXACT = [*TINY, "trainer.deterministic=true", "trainer.feature_cache.dtype=float32",
         "dataset.train_fraction=0.2"]


def _run(compose_cfg, tmp_path: Path, name: str, overrides: list[str]):
    store = [] if any(o.startswith("trainer.feature_cache.dir") for o in overrides) else [
        f"trainer.feature_cache.dir={tmp_path / 'store'}"]  # this test's own store
    result = train(compose_cfg([*EXACT, *store, *overrides]), tmp_path / name)
    return result, json.loads((tmp_path / name / "metrics.json").read_text())


def _same_numbers(a: dict, b: dict) -> None:
    keys = ("epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for k in keys:
            if isinstance(ra[k], str):
                assert ra[k] == rb[k]
            else:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (k, ra, rb)


@pytest.mark.slow
@pytest.mark.parametrize("policy, expect", [
    (["freeze=linear_probe", "trainer.epochs=3"], {"head": "whole backbone (pooled"}),
    (["freeze=top_k", "freeze.k=2", "trainer.epochs=2"], {"top2": "after block"}),
    (["freeze=two_stage", "freeze.head_epochs=2", "freeze.finetune_epochs=2",
      "freeze.fine_tune_at=3"], {"head": "whole backbone (pooled", "finetune": "after block"}),
])
def test_cached_and_uncached_runs_give_the_same_numbers_and_weights(compose_cfg, tmp_path,
                                                                     policy, expect):
    cached, mc = _run(compose_cfg, tmp_path, "cached", policy)
    plain, mp = _run(compose_cfg, tmp_path, "plain", [*policy, "trainer.feature_cache.mode=off"])
    _same_numbers(mc, mp)
    for stage, cut in expect.items():
        assert cut in mc["feature_cache"][stage]["cut"]
        assert mc["feature_cache"][stage]["misses"] == 2  # train and val, extracted once
    assert "feature_cache" not in mp or all(r["cut"] is None for r in mp["feature_cache"].values())
    wa, wb = cached.built.model.state_dict(), plain.built.model.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_a_second_run_reads_the_store_and_trains_the_same(compose_cfg, tmp_path):
    store = tmp_path / "store"
    first, m1 = _run(compose_cfg, tmp_path, "a", ["trainer.epochs=2",
                                                  f"trainer.feature_cache.dir={store}"])
    second, m2 = _run(compose_cfg, tmp_path, "b", ["trainer.epochs=2",
                                                   f"trainer.feature_cache.dir={store}"])
    assert m1["feature_cache"]["head"]["splits"] == {"train": "extracted", "val": "extracted"}
    assert m2["feature_cache"]["head"]["splits"] == {"train": "disk", "val": "disk"}
    assert m2["feature_cache"]["head"]["hits"] == 2
    _same_numbers(m1, m2)
    assert len([p for p in store.iterdir() if p.is_dir()]) == 2  # one entry per split


@pytest.mark.slow
@pytest.mark.parametrize("overrides, reason", [
    (["augment=flip"], "augment=flip makes the training images random"),
    (["freeze=none"], "not cached"),
])
def test_the_cache_is_not_used_where_it_would_be_wrong(compose_cfg, tmp_path, overrides, reason):
    _, m = _run(compose_cfg, tmp_path, "r", overrides)
    (report,) = m["feature_cache"].values()
    assert report["cut"] is None and reason in report["reason"]


@pytest.mark.slow
def test_bn_train_in_a_frozen_block_moves_the_cut_or_stops_it(compose_cfg, tmp_path):
    _, m = _run(compose_cfg, tmp_path, "r", [
        "freeze=two_stage", "freeze.head_epochs=1", "freeze.finetune_epochs=1",
        "freeze.finetune_bn=train"])
    assert m["feature_cache"]["head"]["cut"].startswith("the whole backbone")
    finetune = m["feature_cache"]["finetune"]
    assert finetune["cut"] is None
    assert "BatchNorm" in finetune["reason"] and "train mode" in finetune["reason"]


def _toy_backbone(middle: nn.Module) -> tuple[TransferModel, Backbone]:
    torch.manual_seed(0)
    body = nn.Sequential()
    body.add_module("conv1", nn.Conv2d(3, 4, 3, padding=1))
    body.add_module("middle", middle)  # inside block "first"
    body.add_module("bn1", nn.BatchNorm2d(4))
    body.add_module("conv2", nn.Conv2d(4, 4, 3, padding=1))
    backbone = Backbone("toy", body, [Block("first", ("conv1", "bn1")),
                                      Block("second", ("conv2",))],
                        InputSpec(8, (0.5,) * 3, (0.5,) * 3), pretrained=False)
    shape = probe_features(backbone, 8)
    model = TransferModel(body, build_head(_head(), shape, 2))
    return model, backbone


def _head():
    from transferlab.config import HeadConfig
    return HeadConfig(name="linear")


def _stage(model, backbone, train: list[str]):
    from transferlab.config import FreezeConfig, SelectorSpec, StageSpec
    policy = FreezeConfig(name="x", stages=[StageSpec("s", 1, [SelectorSpec(t) for t in train],
                                                      bn="frozen")])
    (plan,) = plan_stages(model, backbone, policy, 1e-3)
    apply_stage(model, plan)
    set_train_mode(model, plan)


def test_active_dropout_in_the_prefix_stops_the_cut():
    model, backbone = _toy_backbone(nn.Dropout(0.5))
    _stage(model, backbone, ["head", "blocks[1]"])
    cut, why = find_cut(model, backbone, 8, {})
    assert cut is None and "Dropout backbone.middle is active" in why

    model, backbone = _toy_backbone(nn.Dropout(0.0))  # p=0: the identity, deterministic
    _stage(model, backbone, ["head", "blocks[1]"])
    cut, why = find_cut(model, backbone, 8, {})
    assert cut is not None and cut.last_block == "first" and [s.path for s in cut.prefix] == [
        "conv1", "middle", "bn1"]

    model, backbone = _toy_backbone(nn.ReLU())
    _stage(model, backbone, ["head"])
    cut, _ = find_cut(model, backbone, 8, {})
    assert cut.whole and cut.pooled


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11"])
def test_sequential_views_of_torchvision_backbones_match_the_module(name):
    torch.manual_seed(0)
    backbone = build_backbone(TorchvisionBackboneConfig(name=name, pretrained=False))
    probe_features(backbone, 64)
    segments = sequential_view(backbone, 64)
    assert segments is not None
    cuts = block_boundaries(segments, backbone)
    # every block ends at a boundary: the blocks before each cut are whole
    assert len(cuts) >= len(backbone.blocks) - 1


def _folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "images"


def _tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                             pretrained=False))
    probe_features(backbone, 32)
    return backbone


def _pooled(backbone, splits, store: Path, size: int = 32, identity: str = "content") -> dict:
    cache = FeatureCache(FeatureCacheConfig(dir=str(store), dtype="float32", identity=identity),
                         CPU, Precision(CPU, "off"), False, 8, 0)
    out = cache.pooled_features(backbone, size, {"train": splits.train, "val": splits.val})
    return {"sources": cache.report["features"]["splits"], "features": out}


def test_a_changed_input_gives_a_new_key(tmp_path):
    root = _folder(tmp_path)
    cfg = FolderDatasetConfig(name="f", kind="image_folder", root=str(root))
    backbone = _tiny_backbone()
    splits = build_splits(cfg, AugmentConfig(), backbone.input, 32)
    store = tmp_path / "store"

    first = _pooled(backbone, splits, store)
    assert first["sources"] == {"train": "extracted", "val": "extracted"}
    again = _pooled(backbone, splits, store)
    assert again["sources"] == {"train": "disk", "val": "disk"}
    np.testing.assert_array_equal(first["features"]["train"][0], again["features"]["train"][0])

    # touching one training image: its content is the same (identity=content, the default);
    # identity=stat (path, size, mtime) extracts train again, val still read from the store
    image = root / "train" / "a" / "0.png"
    stat = image.stat()
    assert _pooled(backbone, splits, store, identity="stat")["sources"]["train"] == "extracted"
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert _pooled(backbone, splits, store)["sources"] == {"train": "disk", "val": "disk"}
    assert _pooled(backbone, splits, store, identity="stat")["sources"] == {
        "train": "extracted", "val": "disk"}

    # another image of the same size in its place, its modification time kept: only
    # identity=content sees it
    stat = image.stat()
    pixels = np.random.default_rng(7).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)  # noise: stored, not compressed: the same size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    assert _pooled(backbone, splits, store, identity="stat")["sources"]["train"] == "disk"
    assert _pooled(backbone, splits, store)["sources"] == {"train": "extracted", "val": "disk"}

    # another image size: every split again
    splits48 = build_splits(cfg, AugmentConfig(), backbone.input, 48)
    assert _pooled(backbone, splits48, store, 48)["sources"] == {"train": "extracted",
                                                                 "val": "extracted"}

    # changed weights: every split again; and a BatchNorm buffer counts too
    with torch.no_grad():
        next(backbone.module.parameters()).add_(1e-3)
    assert _pooled(backbone, splits, store)["sources"] == {"train": "extracted",
                                                           "val": "extracted"}
    bn = next(m for m in backbone.module.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_mean.add_(1e-3)
    assert _pooled(backbone, splits, store)["sources"]["val"] == "extracted"


def test_dataset_identity_covers_the_transform(tmp_path):
    root = _folder(tmp_path)
    cfg = FolderDatasetConfig(name="f", kind="image_folder", root=str(root))
    spec = InputSpec(32, (0.5,) * 3, (0.5,) * 3)
    a = build_splits(cfg, AugmentConfig(), spec, 32)
    b = build_splits(cfg, AugmentConfig(), InputSpec(32, (0.4,) * 3, (0.5,) * 3), 32)
    c = build_splits(FolderDatasetConfig(name="f", kind="image_folder", root=str(root),
                                         crop_pct=0.5), AugmentConfig(), spec, 32)
    ids = {dataset_identity(s.val) for s in (a, b, c)}
    assert len(ids) == 3 and None not in ids
    assert dataset_identity(a.val) == dataset_identity(
        build_splits(cfg, AugmentConfig(), spec, 32).val)


# -- processes: concurrent and killed extractions ---------------------------------------------

_WORKER = textwrap.dedent("""
    import sys, time, json
    import torch
    from transferlab.backbones import build_backbone, probe_features
    from transferlab.config import BackboneConfig, FeatureCacheConfig
    from transferlab.data.digits import TensorImageDataset
    from transferlab.data.transforms import eval_transform
    from transferlab.feature_cache import FeatureCache
    from transferlab.infra.runtime import Precision

    class Slow(TensorImageDataset):
        def __getitem__(self, i):
            time.sleep(float(sys.argv[2]))
            return super().__getitem__(i)

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                             pretrained=False))
    probe_features(backbone, 32)
    images = torch.randint(0, 255, (24, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    data = Slow(images, [i % 2 for i in range(24)], eval_transform(backbone.input, 32))
    cpu = torch.device("cpu")
    cache = FeatureCache(FeatureCacheConfig(dir=sys.argv[1], dtype="float32"), cpu,
                         Precision(cpu, "off"), False, 4, 0)
    print("started", flush=True)
    out = cache.pooled_features(backbone, 32, {"train": data})
    print(json.dumps({"source": cache.report["features"]["splits"]["train"],
                      "sum": float(out["train"][0].sum())}), flush=True)
""")


def _worker(store: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(store), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_wanting_one_entry_extract_it_once(tmp_path):
    store = tmp_path / "store"
    procs = [_worker(store, 0.05), _worker(store, 0.05)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    assert sorted(r["source"] for r in results) == ["disk", "extracted"]
    assert results[0]["sum"] == results[1]["sum"]
    assert DiskStore(store).get(next(p.name for p in store.iterdir() if p.is_dir()
                                     and not p.name.startswith("."))) is not None


@pytest.mark.slow
def test_a_killed_extraction_leaves_nothing_a_later_run_trusts(tmp_path):
    store = tmp_path / "store"
    slow = _worker(store, 0.5)  # 24 images at 0.5 s: killed part-way
    assert slow.stdout.readline().strip() == "started"
    deadline = time.time() + 60
    while not list(store.glob(".tmp-*")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(store.glob(".tmp-*")), "the extraction never started writing"
    slow.send_signal(signal.SIGKILL)
    slow.communicate()
    entries = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert entries == []  # only the temporary folder: no entry
    fresh = _worker(store, 0.0)
    out, err = fresh.communicate(timeout=240)
    assert fresh.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["source"] == "extracted"
    assert not list(store.glob(".tmp-*"))  # the dead process's folder was removed
