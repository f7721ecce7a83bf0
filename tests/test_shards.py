"""WebDataset shards: written from a folder by transferlab-shard, trained from as the folder is
(same numbers, with and without the feature cache), and streamed across DDP ranks and loader
workers with every sample read exactly once per epoch."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
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

    def build(**urls):
        return DATASETS.builder("webdataset")(
            WebDatasetConfig(name="w", cache_dir=str(tmp_path / "cache"), **urls), _value,
            _value)

    local = build(urls=report.splits["train"]["urls"], val_urls=report.splits["val"]["urls"])
    try:
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
    copies = sorted(p.name for p in (tmp_path / "cache").glob("*/*"))
    assert copies == sorted(["index.json", *(Path(u).name for s in ("train", "val")
                                             for u in expand_urls(report.splits[s]["urls"]))])
    with pytest.raises(UserError, match=r"^dataset.urls: could not download http://127.0.0.1:"
                                        r"\d+/other-000000.tar \(.*\): check the network, or "
                                        r"download the shards and give their local paths$"):
        build(urls=f"{url}/other-000000.tar")
