"""WebDataset shards: written from a folder by transferlab-shard, trained from as the folder is
(same numbers, with and without the feature cache), and streamed across DDP ranks and loader
workers with every sample read exactly once per epoch."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from transferlab.data.shards import ShardStream, expand_urls, shard_counts
from transferlab.errors import UserError
from transferlab.tools.shard import write_shards

from .conftest import TINY


def _value(image: Image.Image) -> int:
    """The sample number a test image was drawn with (its red and green channels)."""
    r, g, _ = image.getpixel((0, 0))
    return r * 256 + g


def _numbered_folder(root: Path, n: int, classes: int = 2) -> None:
    """``n`` 4x4 PNGs under root/<class>/, each filled with its own number."""
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (i // 256, i % 256, 7)).save(folder / f"{i:04d}.png")


def test_expand_urls_ranges_alternatives_and_lists():
    assert expand_urls("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar",
                                               "a-011.tar"]
    assert expand_urls("{x,y}/s-{0..1}.tar::z.tar") == ["x/s-0.tar", "x/s-1.tar", "y/s-0.tar",
                                                       "y/s-1.tar", "z.tar"]


def test_two_ranks_of_two_workers_read_every_sample_once_per_epoch(tmp_path):
    _numbered_folder(tmp_path / "images", 60)
    report = write_shards(tmp_path / "images", tmp_path / "shards", maxcount=7)
    urls = expand_urls(report.splits["train"]["urls"])
    assert len(urls) == 9 and report.splits["train"]["count"] == 60
    counts = shard_counts(urls)
    assert sum(counts) == 60
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = ShardStream(urls, counts, "png", transform=_value, seed=3,
                                 shuffle_buffer=10, rank=rank, world_size=2)
            stream.set_epoch(epoch)
            assert len(stream) == 30
            loader = DataLoader(stream, batch_size=4, num_workers=2)
            values = [int(v) for images, _ in loader for v in images]
            assert len(values) == 30
            seen += values
        assert sorted(seen) == list(range(60))  # exactly once: no sample twice, none missing
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order each epoch


def test_labels_come_from_the_cls_members(tmp_path):
    _numbered_folder(tmp_path / "images", 12, classes=3)
    report = write_shards(tmp_path / "images", tmp_path / "shards", maxcount=5)
    assert report.classes == ["c0", "c1", "c2"]
    urls = expand_urls(report.splits["train"]["urls"])
    stream = ShardStream(urls, shard_counts(urls), "png", transform=_value)
    pairs = sorted((_v, int(y)) for _v, y in stream)
    assert pairs == [(i, i % 3) for i in range(12)]
    with tarfile.open(urls[0]) as tar:
        assert tar.getnames()[:2] == ["train_000000.png", "train_000000.cls"]
        assert tar.extractfile("train_000000.cls").read() == b"0"


def test_shard_writer_refuses_a_folder_that_already_holds_shards(tmp_path):
    _numbered_folder(tmp_path / "images", 4)
    write_shards(tmp_path / "images", tmp_path / "shards", maxcount=5)
    with pytest.raises(UserError, match="already holds 1 .tar"):
        write_shards(tmp_path / "images", tmp_path / "shards", maxcount=5)


def _history(cfg, run_dir: Path) -> tuple[list[tuple], dict]:
    """(train loss, val loss, val acc) of every epoch of the run of ``cfg``, and its
    feature cache report."""
    from transferlab.run import train

    train(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    return ([(h["train_loss"], h["val_loss"], h["val_acc"]) for h in metrics["history"]],
            metrics.get("feature_cache", {}))


@pytest.mark.slow
@pytest.mark.data
def test_hymenoptera_from_shards_trains_as_from_its_folder(compose_cfg, hymenoptera, tmp_path,
                                                           one_thread):
    """The same numbers, epoch by epoch, to the last digit, from the folder and from its
    shards (the same images in the same order), with the feature cache (float32: exact) and
    without it; a second cached run finds the shards' entries on disk (a stable identity).
    The tiny random backbone keeps it fast: every val image's logits enter val_loss, so any
    image read differently would show."""
    report = write_shards(hymenoptera, tmp_path / "shards", maxcount=100)
    assert {s: i["count"] for s, i in report.splits.items()} == {"train": 244, "val": 153}
    same = [*TINY, "freeze=linear_probe", "augment=none", "trainer.deterministic=true",
            "trainer.epochs=2", "optimizer.lr=0.01", "trainer.feature_cache.dtype=float32",
            f"trainer.feature_cache.dir={tmp_path}/store"]
    folder = ["dataset=hymenoptera", f"dataset.root={hymenoptera}"]
    shards = ["dataset=webdataset", f"dataset.urls='{report.splits['train']['urls']}'",
              f"dataset.val_urls='{report.splits['val']['urls']}'"]
    off = "trainer.feature_cache.mode=off"
    expected, _ = _history(compose_cfg([*folder, *same, off]), tmp_path / "folder")
    plain, _ = _history(compose_cfg([*shards, *same, off]), tmp_path / "shards")
    cached, first = _history(compose_cfg([*shards, *same]), tmp_path / "cached")
    again, second = _history(compose_cfg([*shards, *same]), tmp_path / "again")
    assert plain == cached == again == expected, (expected, plain, cached, again)
    assert expected[0] != expected[1]  # it trained
    assert first["head"]["splits"] == {"train": "extracted", "val": "extracted"}
    assert second["head"]["splits"] == {"train": "disk", "val": "disk"}


def test_a_run_reads_the_shards_images_and_labels_as_the_folders(tmp_path):
    """dataset=webdataset's splits hold the folder's images, labels and classes, in order."""
    from transferlab.config.schema import FolderDatasetConfig, WebDatasetConfig
    from transferlab.registry import DATASETS

    for split, n in (("train", 9), ("val", 6)):
        _numbered_folder(tmp_path / "images" / split, n, classes=3)
    report = write_shards(tmp_path / "images", tmp_path / "shards", maxcount=4)
    folder = DATASETS.builder("image_folder")(
        FolderDatasetConfig(name="f", root=str(tmp_path / "images")), _value, _value)
    shards = DATASETS.builder("webdataset")(
        WebDatasetConfig(name="w", urls=report.splits["train"]["urls"],
                         val_urls=report.splits["val"]["urls"]), _value, _value)
    assert shards.classes == folder.classes == ["c0", "c1", "c2"]
    for split in ("train", "val"):
        a, b = getattr(folder, split), getattr(shards, split)
        assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert len(shards.train) == 9 and shards.train_labels == folder.train_labels


def test_shards_without_an_index_are_read_from_their_tar_headers(tmp_path):
    """Shards of another writer (no index.json): the same samples, found by scanning; the
    class names are then the label numbers."""
    from transferlab.data.shards import index_shards

    _numbered_folder(tmp_path / "images", 10, classes=2)
    report = write_shards(tmp_path / "images", tmp_path / "shards", maxcount=4)
    pattern = report.splits["train"]["urls"]
    indexed, classes = index_shards(pattern, "png", "cls")
    (tmp_path / "shards" / "index.json").unlink()
    scanned, none = index_shards(pattern, "png", "cls")
    assert scanned == indexed and len(scanned) == 10 and classes == ["c0", "c1"]
    assert none is None
    with pytest.raises(UserError, match="no sample in 3 shard.*has an image \\(jpg\\)"):
        index_shards(pattern, "jpg", "cls")


def test_the_shard_command_prints_the_overrides_that_train_from_its_shards(tmp_path, capsys,
                                                                          compose_cfg):
    """transferlab-shard: what it prints composes (Hydra's grammar, braces quoted) into the
    dataset it wrote; a mistake is one line and exit 2."""
    import shlex

    from transferlab.cli import shard as shard_cli
    from transferlab.config import load_config
    from transferlab.registry import DATASETS

    for split, n in (("train", 8), ("val", 4)):
        _numbered_folder(tmp_path / "images" / split, n)
    assert shard_cli.main([f"root={tmp_path / 'images'}", f"output={tmp_path / 's'}",
                           "maxcount=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["train", "val"]
    overrides = [shlex.split(line.split("shard(s): ")[1])[0] for line in lines]
    run = load_config(compose_cfg(["dataset=webdataset", *overrides]))
    splits = DATASETS.builder("webdataset")(run.dataset, _value, _value)
    assert (len(splits.train), len(splits.val)) == (8, 4)
    assert shard_cli.main([f"root={tmp_path / 'none'}", f"output={tmp_path / 't'}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: root=") and "is not a folder" in line


@pytest.mark.slow  # a real HTTP server and downloads (under a second)
def test_remote_shards_are_downloaded_once_and_read_as_local_ones(tmp_path):
    """Shards on an HTTP server (a real one, on this machine): the run's splits hold the same
    images, labels and class names (their index.json came along) as from the local shards; a
    second build reads the local copies (the server is gone); an unreachable shard is one
    line saying what to do."""
    import functools
    import http.server
    import threading

    from transferlab.config.schema import WebDatasetConfig
    from transferlab.registry import DATASETS

    for split, n in (("train", 9), ("val", 6)):
        _numbered_folder(tmp_path / "images" / split, n, classes=3)
    report = write_shards(tmp_path / "images", tmp_path / "shards", maxcount=4)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "shards")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def remote(split: str) -> str:
        return report.splits[split]["urls"].replace(str(tmp_path / "shards"), url)

    def build(train_tf=_value, **urls):
        return DATASETS.builder("webdataset")(
            WebDatasetConfig(name="w", cache_dir=str(tmp_path / "cache"), **urls), train_tf,
            _value)

    local = build(urls=report.splits["train"]["urls"], val_urls=report.splits["val"]["urls"])
    try:
        streamed = build(_noisy, urls=remote("train"), val_urls=remote("val"), stream=True)
        read = [v for batch in _epoch(streamed, 1) for v, _, _ in batch]
        assert not list((tmp_path / "cache").glob("*/train-*"))  # streamed: never copied
        fetched = build(urls=remote("train"), val_urls=remote("val"))
    finally:
        server.shutdown()
        server.server_close()
    again = build(urls=remote("train"), val_urls=remote("val"))
    for splits in (fetched, again):
        assert splits.classes == local.classes == ["c0", "c1", "c2"]
        for split in ("train", "val"):
            a, b = getattr(local, split), getattr(splits, split)
            assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    # 8 of the 9 training images: a last batch of one (of 4) is left out
    assert len(set(read)) == len(read) == 8 and set(read) < {local.train[i][0] for i in range(9)}
    copies = sorted(p.name for p in (tmp_path / "cache").glob("*/*"))
    assert copies == sorted(["index.json", *(Path(u).name for s in ("train", "val")
                                             for u in expand_urls(report.splits[s]["urls"]))])
    with pytest.raises(UserError, match=r"^dataset.urls: could not download http://127.0.0.1:"
                                        r"\d+/other-000000.tar \(.*\): check the network, or "
                                        r"download the shards and give their local paths$"):
        build(urls=f"{url}/other-000000.tar")


# --- dataset.stream=true: the training shards streamed inside a run ---------------------------

def _noisy(image: Image.Image) -> tuple[int, float]:
    """A sample's number and a random draw (an augmentation's randomness)."""
    return _value(image), float(torch.rand(()))


def _write_stream(tmp_path: Path, n: int = 30) -> dict:
    for split, count in (("train", n), ("val", 6)):
        _numbered_folder(tmp_path / "images" / split, count, classes=3)
    return write_shards(tmp_path / "images", tmp_path / "shards", maxcount=7).splits


def _build_stream(splits: dict, **cfg):
    """The streamed training split of shards written by :func:`_write_stream`, and val."""
    from transferlab.config.schema import WebDatasetConfig
    from transferlab.registry import DATASETS

    return DATASETS.builder("webdataset")(
        WebDatasetConfig(name="w", urls=splits["train"]["urls"], stream=True,
                         val_urls=splits["val"]["urls"], **cfg), _noisy, _value)


def _epoch(splits, epoch: int, workers: int = 0, skip: int = 0, rank: int = 0,
           world: int = 1) -> list[list[tuple[int, float, int]]]:
    """One epoch of the run's loader: every batch's (number, draw, label)s."""
    from transferlab.config.schema import TrainerConfig
    from transferlab.data import epoch_order, make_loaders
    from transferlab.infra.distributed import World

    train, _ = make_loaders(splits, TrainerConfig(batch_size=4, num_workers=workers), seed=5,
                            device=torch.device("cpu"),
                            world=World(rank=rank, size=world) if world > 1 else None)
    order = epoch_order(train)
    order.set_epoch(epoch)
    order.skip_batches = skip
    return [[(int(v), float(d), int(y)) for v, d, y in zip(values, draws, labels, strict=True)]
            for (values, draws), labels in train]


def test_a_streamed_split_reads_every_image_once_an_epoch_and_resumes_mid_epoch(tmp_path):
    """dataset.stream=true: the run's loader reads the 30 images once an epoch (batches of 4:
    7 whole and one of 2), in a new order each epoch; an image's augmentation is drawn by
    (seed, epoch, image), so a loader told to skip 3 batches (a resume mid-epoch) delivers
    exactly the rest of the epoch, the same draws included."""
    splits = _build_stream(_write_stream(tmp_path), shuffle_buffer=5)
    assert len(splits.train) == 30 and splits.train_labels == sorted(i % 3 for i in range(30))
    first = _epoch(splits, 1)
    assert [len(b) for b in first] == [4] * 7 + [2]
    items = [item for batch in first for item in batch]
    assert sorted(v for v, _, _ in items) == list(range(30))
    assert all(y == v % 3 for v, _, y in items)
    assert [item for batch in _epoch(splits, 1, skip=3) for item in batch] == items[12:]
    second = [item for batch in _epoch(splits, 2) for item in batch]
    assert [v for v, _, _ in second] != [v for v, _, _ in items]
    assert {v: d for v, d, _ in second} != {v: d for v, d, _ in items}  # new draws


@pytest.mark.slow  # loader worker processes
def test_a_streamed_split_shared_by_two_ranks_of_two_workers(tmp_path):
    """Two ranks of two loader workers: every image once an epoch across the ranks, each
    image drawn as with no worker process; a resume mid-epoch skips exactly the batches the
    loader delivered first, workers taking turns."""
    splits = _build_stream(_write_stream(tmp_path, n=46), shuffle_buffer=5)
    single = {v: d for batch in _epoch(splits, 1) for v, d, _ in batch}
    seen = []
    for rank in (0, 1):
        batches = _epoch(splits, 1, workers=2, rank=rank, world=2)
        assert [len(b) for b in batches] == [4] * 5 + [3]  # 23 of the 46 a rank
        seen += [item for batch in batches for item in batch]
        assert _epoch(splits, 1, workers=2, skip=3, rank=rank, world=2) == batches[3:]
    assert sorted(v for v, _, _ in seen) == list(range(46))  # each once
    assert all(single[v] == d for v, d, _ in seen)


def test_a_streamed_split_refuses_what_needs_an_index(tmp_path):
    """What needs the training images by index is one line naming what to change."""
    from transferlab.config.schema import TrainerConfig
    from transferlab.data import make_loaders

    written = _write_stream(tmp_path)
    with pytest.raises(UserError, match=r"^dataset.stream=true reads the training shards in "
                                        r"order, so a training subset cannot be drawn"):
        _build_stream(written, train_fraction=0.5)
    with pytest.raises(UserError, match=r"^dataset.stream=true reads the training shards in "
                                        r"order, so val cannot be held out of them"):
        _build_stream({**written, "val": {"urls": None}})
    with pytest.raises(UserError, match=r"^trainer.sampler=balanced draws images by index"):
        make_loaders(_build_stream(written), TrainerConfig(sampler="balanced", num_workers=0),
                     seed=0, device=torch.device("cpu"))
    (tmp_path / "shards" / "index.json").unlink()
    with pytest.raises(UserError, match=r"^cannot read the sample counts of 5 shard\(s\)"):
        _build_stream(written)


@pytest.mark.slow
def test_a_run_streams_its_training_shards_and_resumes_from_a_pause_bit_for_bit(tmp_path):
    """dataset=webdataset dataset.stream=true end to end: a linear probe (whose features are
    not cached: the split has no index to key them by) trains 3 epochs of 30 streamed images;
    paused after epoch 1 and resumed, it ends with the uninterrupted run's weights and
    record, to the last bit."""
    from transferlab.run import resume_run, train

    from .conftest import compose_train

    written = _write_stream(tmp_path)
    given = [*TINY, "dataset=webdataset", f"dataset.urls='{written['train']['urls']}'",
             f"dataset.val_urls='{written['val']['urls']}'", "dataset.stream=true",
             "dataset.shuffle_buffer=8", "freeze=linear_probe", "trainer.epochs=3",
             "trainer.batch_size=4", "augment=none", "trainer.deterministic=true",
             f"trainer.feature_cache.dir={tmp_path / 'cache'}"]
    reference = train(compose_train(given), tmp_path / "ref", overrides=given)
    metrics = reference.metrics
    assert metrics["status"] == "completed" and metrics["data"]["train"] == 30
    assert [stage["reason"] for stage in metrics["feature_cache"].values()] == [
        "not cached: the training split is streamed (dataset.stream=true)"]
    paused = [*given, "trainer.pause_after_epoch=1"]
    assert train(compose_train(paused), tmp_path / "run", overrides=paused).metrics[
        "status"] == "paused"
    done = resume_run(tmp_path / "run")
    a, b = (torch.load(r.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
            for r in (reference, done))
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) == 0.0
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in done.metrics["history"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in metrics["history"]]
    losses = [r["train_loss"] for r in metrics["history"]]
    assert len(set(losses)) == 3  # it trained
