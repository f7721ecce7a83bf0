"""Datasets: digits, image folders (given splits or a stratified seeded split), transforms."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.backbones import InputSpec
from transferlab.config import (
    AugmentConfig,
    CsvDatasetConfig,
    DatasetConfig,
    FolderDatasetConfig,
    TrainerConfig,
    compose_config,
    load_config,
    make_config,
)
from transferlab.data import build_splits, make_loaders, stratified_split, train_subset
from transferlab.data.transforms import train_transform
from transferlab.errors import UserError

SPEC = InputSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NONE = AugmentConfig(name="none")


def make_folder(root, counts: dict[str, int], size=40):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            color = (hash(cls) % 255, i * 7 % 255, 100)
            Image.new("RGB", (size, size + 8), color).save(root / cls / f"{i}.jpg")


def test_digits_splits_are_stratified_and_shaped():
    cfg = DatasetConfig(name="digits", kind="digits", image_size=64, crop_pct=1.0)
    splits = build_splits(cfg, NONE, SPEC, 32)
    assert len(splits.train) + len(splits.val) == 1797 and splits.num_classes == 10
    x, y = splits.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert x.min() >= -1.0 and x.max() <= 1.0  # normalised with mean/std 0.5
    val_counts = Counter(splits.val.labels)
    assert min(val_counts.values()) >= 34 and len(val_counts) == 10


def test_image_folder_with_train_and_val(tmp_path):
    make_folder(tmp_path / "train", {"ants": 6, "bees": 5})
    make_folder(tmp_path / "val", {"ants": 3, "bees": 2})
    (tmp_path / "train" / "ants" / "notes.txt").write_text("not an image")
    cfg = FolderDatasetConfig(name="f", kind="image_folder", root=str(tmp_path))
    splits = build_splits(cfg, NONE, SPEC, 32)
    assert splits.classes == ["ants", "bees"]
    assert (len(splits.train), len(splits.val)) == (11, 5)
    assert [p.endswith("notes.txt") for p in splits.skipped] == [True]
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_single_folder_split_is_stratified_and_seeded(tmp_path):
    make_folder(tmp_path, {"a": 20, "b": 10, "c": 10})
    cfg = FolderDatasetConfig(name="f", kind="image_folder", root=str(tmp_path), val_fraction=0.25)
    one = build_splits(cfg, NONE, SPEC, 32)
    two = build_splits(cfg, NONE, SPEC, 32)
    counts = Counter(y for _, y in one.val.samples)
    assert counts[0] == 5 and counts[1] in (2, 3) and counts[1] + counts[2] == 5
    assert one.val.samples == two.val.samples
    other = build_splits(FolderDatasetConfig(name="f", kind="image_folder", root=str(tmp_path),
                                       val_fraction=0.25, split_seed=1), NONE, SPEC, 32)
    assert other.val.samples != one.val.samples
    assert not set(one.val.samples) & set(one.train.samples)


def test_stratified_split_keeps_class_proportions():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert Counter(labels[i] for i in held) == {0: 10, 1: 6, 2: 4}
    assert sorted(keep + held) == list(range(100))


@pytest.mark.parametrize("layout, message", [
    ({"train": {"a": 2, "b": 2}}, "no val/"),
    ({"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1}}, "class folders"),
    ({"only": {"x": 3}}, "2 images"),
])
def test_bad_folders_are_clear_errors(tmp_path, layout, message):
    for split, counts in layout.items():
        make_folder(tmp_path / split if split != "only" else tmp_path, counts)
    cfg = FolderDatasetConfig(name="f", kind="image_folder", root=str(tmp_path))
    with pytest.raises(UserError) as err:
        build_splits(cfg, NONE, SPEC, 32)
    assert "\n" not in str(err.value)


def test_crop_flip_is_random_and_eval_is_not():
    from transferlab.data.transforms import eval_transform, train_transform

    image = Image.new("RGB", (50, 40))
    image.paste((255, 0, 0), (0, 0, 25, 40))
    aug = train_transform(SPEC, 32, make_config("augment", "crop_flip"))
    outs = {tuple(aug(image).flatten()[:50].tolist()) for _ in range(10)}
    assert len(outs) > 1
    det = eval_transform(SPEC, 32)
    assert torch.equal(det(image), det(image)) and det(image).shape == (3, 32, 32)


def _subset_cfg(**kw) -> DatasetConfig:
    return DatasetConfig(name="t", kind="digits", **kw)


def test_train_fraction_keeps_every_class_and_follows_the_seed():
    labels = [c for c in range(5) for _ in range(40)] + [5, 5]  # class 5 has only two images
    pick = train_subset(labels, _subset_cfg(train_fraction=0.05, subset_seed=1))
    kept = [labels[i] for i in pick]
    assert sorted(set(kept)) == list(range(6))  # the rare class too
    assert all(kept.count(c) == 2 for c in range(5)) and kept.count(5) == 1
    assert pick == train_subset(labels, _subset_cfg(train_fraction=0.05, subset_seed=1))
    assert pick != train_subset(labels, _subset_cfg(train_fraction=0.05, subset_seed=2))
    assert train_subset(labels, _subset_cfg()) == list(range(len(labels)))


def test_samples_per_class_caps_each_class():
    labels = [0] * 30 + [1] * 3
    kept = [labels[i] for i in train_subset(labels, _subset_cfg(samples_per_class=5))]
    assert kept.count(0) == 5 and kept.count(1) == 3


def build_splits_for(compose_cfg, overrides):
    run = load_config(compose_cfg(overrides))
    return build_splits(run.dataset, run.augment, SPEC, 32)


@pytest.mark.slow  # (builds the run's data: about a second)
def test_train_fraction_reaches_the_run(compose_cfg):
    full = build_splits_for(compose_cfg, [])
    part = build_splits_for(compose_cfg, ["dataset.train_fraction=0.1", "seed=3"])
    assert len(part.train) == pytest.approx(0.1 * len(full.train), abs=10)
    assert len(part.val) == len(full.val)  # validation is never subsampled
    again = build_splits_for(compose_cfg, ["dataset.train_fraction=0.1", "seed=3"])
    assert torch.equal(part.train.images, again.train.images)


@pytest.mark.parametrize("override", ["dataset.train_fraction=0", "dataset.train_fraction=1.5",
                                      "dataset.samples_per_class=0"])
def test_bad_subset_is_a_clear_error(override, compose_cfg):
    with pytest.raises(UserError, match=override.split("=")[0]):
        load_config(compose_cfg([override]))


# --- robustness, test splits, csv, fake and torchvision sets -------------------------------------


def test_corrupt_and_non_image_files_are_skipped_and_reported(tmp_path, caplog):
    make_folder(tmp_path / "train", {"ants": 6, "bees": 5})
    make_folder(tmp_path / "val", {"ants": 2, "bees": 2})
    (tmp_path / "train" / "ants" / "notes.txt").write_text("not an image")
    good = (tmp_path / "train" / "bees" / "0.jpg").read_bytes()
    (tmp_path / "train" / "bees" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "val" / "ants" / "fake.png").write_bytes(b"\x89PNG not really")
    cfg = FolderDatasetConfig(name="f", kind="image_folder", root=str(tmp_path))
    with caplog.at_level("WARNING"):
        splits = build_splits(cfg, NONE, SPEC, 32)
    assert len(splits.train) == 11 and len(splits.val) == 4
    assert sorted(Path(p).name for p in splits.skipped) == ["broken.jpg", "fake.png",
                                                            "notes.txt"]
    assert sum("skipped 3 file(s)" in r.message for r in caplog.records) == 1
    for i in range(len(splits.train)):  # every image left loads
        assert splits.train[i][0].shape == (3, 32, 32)


def test_test_folder_or_test_fraction_gives_a_test_split(tmp_path):
    make_folder(tmp_path / "a" / "train", {"x": 10, "y": 10})
    make_folder(tmp_path / "a" / "val", {"x": 2, "y": 2})
    make_folder(tmp_path / "a" / "test", {"x": 3, "y": 1})
    splits = build_splits(FolderDatasetConfig(name="a", kind="image_folder",
                                        root=str(tmp_path / "a")), NONE, SPEC, 32)
    assert len(splits.test) == 4 and len(splits.val) == 4 and len(splits.train) == 20
    make_folder(tmp_path / "b", {"x": 20, "y": 20})
    cfg = FolderDatasetConfig(name="b", kind="image_folder", root=str(tmp_path / "b"),
                        val_fraction=0.2, test_fraction=0.2)
    splits = build_splits(cfg, NONE, SPEC, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 8, 8)
    assert Counter(y for _, y in splits.test.samples) == {0: 4, 1: 4}
    names = lambda ds: {p for p, _ in ds.samples}  # noqa: E731
    assert not names(splits.train) & names(splits.test) and not names(splits.val) & names(
        splits.test)
    cfg = FolderDatasetConfig(name="b", root=str(tmp_path / "b"))
    assert build_splits(cfg, NONE, SPEC, 32).test is None


def test_csv_dataset_round_trip(tmp_path):
    make_folder(tmp_path / "tmp", {"c0": 8, "c1": 8})
    images = tmp_path / "images"
    images.mkdir()
    rows = ["id,has_cactus"]
    for cls, flag in (("c0", "0"), ("c1", "1")):
        for p in sorted((tmp_path / "tmp" / cls).iterdir()):
            target = images / f"{cls}_{p.name}"
            p.rename(target)
            rows.append(f"{target.name},{flag}")
    rows.append("missing.jpg,1")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = CsvDatasetConfig(name="cactus", kind="csv", root=str(images),
                        csv_file=str(tmp_path / "train.csv"), x_col="id", y_col="has_cactus",
                        val_fraction=0.25)
    splits = build_splits(cfg, NONE, SPEC, 32)
    assert splits.classes == ["0", "1"] and len(splits.train) == 12 and len(splits.val) == 4
    assert [Path(p).name for p in splits.skipped] == ["missing.jpg"]
    for path, label in splits.train.samples + splits.val.samples:
        assert path.name.startswith(f"c{label}_")
    with pytest.raises(UserError, match="no column 'label'"):
        build_splits(CsvDatasetConfig(name="c", kind="csv", root=str(images),
                                   csv_file=str(tmp_path / "train.csv")), NONE, SPEC, 32)


def test_fake_dataset_composes_and_feeds_a_run(compose_cfg):
    run = load_config(compose_cfg(["dataset=fake"]))
    splits = build_splits(run.dataset, run.augment, SPEC, 32)
    assert len(splits.train) + len(splits.val) == 200 and splits.num_classes == 4
    assert splits.train[0][0].shape == (3, 32, 32)


def test_a_torchvision_set_offline_is_one_clear_line(compose_cfg, tmp_path):
    run = load_config(compose_cfg(["dataset=cifar10", f"dataset.root={tmp_path}",
                                   "dataset.download=false"]))
    with pytest.raises(UserError) as exc:
        build_splits(run.dataset, run.augment, SPEC, 32)
    message = str(exc.value)
    assert "\n" not in message and "CIFAR10" in message and str(tmp_path / "cifar10") in message
    assert "dataset.download=true" in message


def test_a_split_missing_a_class_is_a_clear_error(tmp_path):
    make_folder(tmp_path / "train", {"ants": 3, "bees": 3})
    make_folder(tmp_path / "val", {"ants": 2, "bees": 1})
    (tmp_path / "val" / "bees" / "0.jpg").unlink()
    (tmp_path / "val" / "bees" / "x.txt").write_text("")
    with pytest.raises(UserError, match="holds no readable images"):
        build_splits(FolderDatasetConfig(name="f", kind="image_folder", root=str(tmp_path)), NONE,
                     SPEC, 32)


@pytest.mark.parametrize("name", ["flip", "crop_flip", "standard", "randaugment",
                                  "trivialaugment"])
def test_every_augmentation_randomises_at_the_backbone_size(name, compose_cfg):
    run = load_config(compose_cfg([f"augment={name}"]))
    size = 40
    augment = train_transform(SPEC, size, run.augment)
    pixels = torch.arange(48 * 60 * 3, dtype=torch.int64).reshape(48, 60, 3) % 251
    image = Image.fromarray(pixels.to(torch.uint8).numpy())  # structured: every op changes it
    torch.manual_seed(0)
    outs = [augment(image) for _ in range(8)]
    for out in outs:
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    assert len({o.sum().item() for o in outs}) > 1  # random
    torch.manual_seed(0)
    assert torch.equal(augment(image), outs[0])  # and reproducible by seed


def test_balanced_sampler_and_class_weights_follow_the_counts(tmp_path):
    make_folder(tmp_path, {"many": 30, "few": 6})
    cfg = FolderDatasetConfig(name="f", kind="image_folder", root=str(tmp_path), val_fraction=0.25)
    splits = build_splits(cfg, NONE, SPEC, 16)
    assert splits.class_counts() == [4, 23] or splits.class_counts() == [5, 22]
    few, many = splits.class_counts()
    weights = splits.class_weights()
    assert weights[0] * few == pytest.approx(weights[1] * many)  # equal total weight per class
    assert (weights * torch.tensor([few, many])).sum() == pytest.approx(few + many)

    trainer = TrainerConfig(num_workers=0, batch_size=9, sampler="balanced")
    train, _ = make_loaders(splits, trainer, seed=0, device=torch.device("cpu"))
    drawn = Counter(int(y) for _ in range(20) for _, ys in train for y in ys)
    assert abs(drawn[0] - drawn[1]) < 0.15 * sum(drawn.values())  # classes drawn ~equally
    plain, _ = make_loaders(splits, TrainerConfig(num_workers=0, batch_size=9), 0,
                            torch.device("cpu"))
    assert Counter(int(y) for _, ys in plain for y in ys) == {0: few, 1: many}


@pytest.mark.parametrize("override", ["trainer.label_smoothing=1.0", "trainer.sampler=weighted",
                                      "trainer.class_weights=inverse"])
def test_bad_loss_options_are_clear_errors(override):
    with pytest.raises(UserError, match=override.split("=")[0]):
        load_config(compose_config([override]))


def _csv_images(tmp_path, labels: list[str], bom: bool = False) -> CsvDatasetConfig:
    """Images named 0.png, 1.png... and a CSV giving each its label (as written)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(len(labels)):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    text = "id,label\n" + "".join(f"{i}.png,{y}\n" for i, y in enumerate(labels))
    (tmp_path / "labels.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return CsvDatasetConfig(name="c", root=str(images), csv_file=str(tmp_path / "labels.csv"),
                            val_fraction=0.25)


def test_csv_numeric_labels_are_one_class_however_written(tmp_path):
    cfg = _csv_images(tmp_path, ["1", "1.0", " 1 ", "1", "2", "2.0", "2", "2.00"])
    splits = build_splits(cfg, NONE, SPEC, 32)
    assert splits.classes == ["1", "2"]


def test_csv_numeric_labels_beyond_float_precision_stay_apart(tmp_path):
    big = ["12345678901234567890", "12345678901234567891"]
    cfg = _csv_images(tmp_path, [*big * 4])
    assert build_splits(cfg, NONE, SPEC, 32).classes == sorted(big)


def _rewrite_csv(cfg: CsvDatasetConfig, rows: list[str]) -> None:
    Path(cfg.csv_file).write_text("id,label\n" + "".join(f"{r}\n" for r in rows))


@pytest.mark.parametrize("name", ["../outside.png", "{root}/../outside.png", "/etc/hostname"])
def test_csv_files_outside_the_root_are_refused_unless_allowed(tmp_path, name):
    """A CSV must not steer a run to files elsewhere (they would train, and show in
    TensorBoard's sample grid) unless the user says so."""
    cfg = _csv_images(tmp_path, ["a", "b"] * 4)
    Image.new("RGB", (40, 40)).save(tmp_path / "outside.png")
    name = name.format(root=cfg.root)
    rows = [f"{i}.png,{'ab'[i % 2]}" for i in range(8)] + [f"{name},a"]
    _rewrite_csv(cfg, rows)
    with pytest.raises(UserError) as exc:
        build_splits(cfg, NONE, SPEC, 32)
    assert str(exc.value) == (f"labels.csv row 10: {name!r} is outside dataset.root={cfg.root}: "
                              "list files under the root, or set "
                              "dataset.allow_outside_root=true")
    allowed = dataclasses.replace(cfg, allow_outside_root=True)
    if name != "/etc/hostname":  # (not an image: skipped as one)
        splits = build_splits(allowed, NONE, SPEC, 32)
        assert len(splits.train) + len(splits.val) == 9


def test_csv_one_file_with_two_labels_is_refused(tmp_path):
    cfg = _csv_images(tmp_path, ["a", "b"] * 4)
    _rewrite_csv(cfg, [f"{i}.png,{'ab'[i % 2]}" for i in range(8)] + ["./0.png,b"])
    with pytest.raises(UserError) as exc:
        build_splits(cfg, NONE, SPEC, 32)
    assert str(exc.value) == ("labels.csv rows 2 and 10 give './0.png' two labels ('a', 'b'): "
                              "keep one row per file")


def test_a_class_with_one_image_is_named_in_the_split_error(tmp_path):
    """Once scikit-learn's text, naming the class by its index ([1])."""
    cfg = _csv_images(tmp_path, ["ants"] * 6 + ["bees"] + ["wasps"] * 5)
    with pytest.raises(UserError) as exc:
        build_splits(cfg, NONE, SPEC, 32)
    assert str(exc.value) == ("cannot split 12 images with val_fraction=0.25 stratified by "
                              "class: class 'bees' has 1 image, every class needs at least 2: "
                              "add images or remove the class")


def test_csv_empty_label_is_refused_with_its_row(tmp_path):
    cfg = _csv_images(tmp_path, ["a", "b", "a", "", "b", "a", "b", "a"])
    with pytest.raises(UserError) as exc:
        build_splits(cfg, NONE, SPEC, 32)
    assert str(exc.value) == ("labels.csv row 5: empty label in column 'label': give every row "
                              "a label, or remove the row")


def test_csv_saved_by_excel_with_a_byte_order_mark_reads(tmp_path):
    cfg = _csv_images(tmp_path, ["a", "b"] * 4, bom=True)
    assert build_splits(cfg, NONE, SPEC, 32).classes == ["a", "b"]


def test_a_float_tiff_in_0_1_is_the_same_image_as_its_8_bit_version(tmp_path):
    """32-bit float TIFFs (values in [0, 1]) once loaded all black."""
    from skimage import data as skdata

    from transferlab.data.image_folder import load_rgb

    gray8 = skdata.camera()
    Image.fromarray(gray8.astype(np.float32) / 255.0, mode="F").save(tmp_path / "f.tif")
    Image.fromarray(gray8).save(tmp_path / "8.png")
    floats, eight = (np.asarray(load_rgb(tmp_path / n)) for n in ("f.tif", "8.png"))
    assert floats.mean() > 50 and np.abs(floats.astype(int) - eight.astype(int)).max() <= 1


def test_a_16_bit_png_is_the_same_image_as_its_8_bit_version(tmp_path):
    from skimage import data as skdata

    from transferlab.data.image_folder import load_rgb

    gray8 = skdata.camera()  # a real photo, 8-bit grayscale
    Image.fromarray(gray8).save(tmp_path / "8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "16.png")  # 0..65535
    with Image.open(tmp_path / "16.png") as im:
        assert im.mode.startswith("I")  # really 16-bit on disk
    eight = np.asarray(load_rgb(tmp_path / "8.png"), dtype=np.int16)
    sixteen = np.asarray(load_rgb(tmp_path / "16.png"), dtype=np.int16)
    assert np.abs(eight - sixteen).max() <= 1
    assert 50 < sixteen.mean() < 200  # not washed out to white


def test_digits_read_from_the_shipped_file_are_scikit_learns():
    """The digits come from the file scikit-learn ships, read without importing it: the same
    images and labels as its ``load_digits``."""
    from sklearn.datasets import load_digits as sklearn_digits

    from transferlab.data.digits import load_digits

    images, labels = load_digits()
    bunch = sklearn_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, bunch.images)
    assert np.array_equal(labels, bunch.target)


def test_a_split_is_remembered_and_read_back_without_scikit_learn(tmp_path, monkeypatch):
    """The first split is scikit-learn's and is written to the cache; the same split again is
    read from there (scikit-learn not called); other labels, fraction or seed: another memo."""
    import sys

    from sklearn.model_selection import train_test_split

    from transferlab.data import stratified_split

    monkeypatch.setenv("TRANSFERLAB_CACHE_DIR", str(tmp_path))
    labels = [i % 3 for i in range(60)]
    keep, held = stratified_split(labels, 0.25, 7)
    want_keep, want_held = train_test_split(list(range(60)), test_size=0.25, stratify=labels,
                                            random_state=7)
    assert (keep, held) == (sorted(want_keep), sorted(want_held))
    assert len(list((tmp_path / "splits").glob("*.json"))) == 1
    monkeypatch.setitem(sys.modules, "sklearn.model_selection", None)  # import fails now
    assert stratified_split(labels, 0.25, 7) == (keep, held)
    with pytest.raises(ImportError):
        stratified_split(labels, 0.25, 8)  # another seed: not remembered


@pytest.mark.slow  # a process of its own
def test_a_process_exits_with_its_loader_processes_still_running():
    """Loader processes ignore SIGTERM (the main process ends them after its checkpoint); a
    process that exits with a loader's iterator alive (persistent workers) still exits at
    once: its loader processes are killed, not sent SIGTERM and waited for forever."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from torch.utils.data import DataLoader, TensorDataset\n"
            "from transferlab.config import TrainerConfig\n"
            "from transferlab.data import DataSplits, make_loaders\n"
            "data = TensorDataset(torch.arange(8.0), torch.zeros(8, dtype=torch.long))\n"
            "splits = DataSplits(train=data, val=data, classes=['a'], train_labels=[0] * 8)\n"
            "train, _ = make_loaders(splits, TrainerConfig(batch_size=2, num_workers=1), 0,\n"
            "                        torch.device('cpu'))\n"
            "assert train.persistent_workers\n"
            "batches = iter(train)\n"
            "next(batches)\n"
            "print('done', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "done\n", "")
