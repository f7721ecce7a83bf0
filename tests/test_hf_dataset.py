"""dataset=hf: a Hugging Face dataset saved locally with ``datasets`` (real images: scikit-learn's
digits), read as a run reads it, trained from with the feature cache keyed by its fingerprint;
without the package, one line naming the extra."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from transferlab.data.digits import load_digits
from transferlab.errors import UserError

from .conftest import TINY

CLASSES = ["zero", "one", "two"]


def _save_digits(folder, per_class: int = 12) -> list[tuple[Image.Image, int]]:
    """A DatasetDict (train, validation) of digits 0-2 as 16x16 PIL images, saved to
    ``folder``; returns the train split's (image, label) rows."""
    datasets = pytest.importorskip("datasets")
    images, labels = load_digits()
    rows = {"train": [], "validation": []}
    for digit in range(3):
        found = np.flatnonzero(labels == digit)[:2 * per_class]
        for n, i in enumerate(found):
            pixels = (images[i] * 255 / 16).astype(np.uint8)
            image = Image.fromarray(pixels).resize((16, 16)).convert("RGB")
            rows["train" if n % 2 == 0 else "validation"].append((image, digit))
    features = datasets.Features({"img": datasets.Image(),
                                  "digit": datasets.ClassLabel(names=CLASSES)})
    saved = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"img": [im for im, _ in r],
                                           "digit": [y for _, y in r]}, features=features)
        for split, r in rows.items()})
    saved.save_to_disk(str(folder))
    return rows["train"]


def test_without_the_package_one_line_names_the_extra(monkeypatch):
    from transferlab.config.schema import HfDatasetConfig
    from transferlab.registry import DATASETS

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(UserError) as info:
        DATASETS.builder("hf")(HfDatasetConfig(name="hf", path="beans"), None, None)
    assert str(info.value) == ("dataset=hf needs the datasets package: "
                               "pip install 'transferlab[hf]'")


@pytest.mark.slow
def test_a_saved_dataset_gives_its_splits_images_and_class_names(tmp_path):
    from transferlab.config.schema import HfDatasetConfig
    from transferlab.feature_cache.identity import dataset_identity
    from transferlab.registry import DATASETS

    train_rows = _save_digits(tmp_path / "digits")
    build = DATASETS.builder("hf")
    cfg = HfDatasetConfig(name="hf", path=str(tmp_path / "digits"), image_key="img",
                          label_key="digit", val_split="validation")
    splits = build(cfg, None, None)
    assert splits.classes == CLASSES and (len(splits.train), len(splits.val)) == (36, 36)
    for i in (0, 17, 35):
        image, label = splits.train[i]
        assert label == train_rows[i][1]
        assert np.array_equal(np.asarray(image), np.asarray(train_rows[i][0]))
    again = build(cfg, None, None)  # loaded again: the same fingerprint, the same identity
    assert dataset_identity(again.train) == dataset_identity(splits.train)
    assert dataset_identity(splits.val) != dataset_identity(splits.train)
    held = build(HfDatasetConfig(name="hf", path=cfg.path, image_key="img", label_key="digit",
                                 val_fraction=0.25), None, None)
    assert (len(held.train), len(held.val)) == (27, 9)  # val held out of train, by class
    with pytest.raises(UserError, match="no column 'image'.*columns: img, digit"):
        build(HfDatasetConfig(name="hf", path=cfg.path, label_key="digit"), None, None)
    with pytest.raises(UserError, match="no split 'valid'.*validation"):
        build(HfDatasetConfig(name="hf", path=cfg.path, image_key="img", label_key="digit",
                              val_split="valid"), None, None)


@pytest.mark.slow
def test_training_from_it_reuses_the_feature_cache(compose_cfg, tmp_path, one_thread):
    from transferlab.run import train

    _save_digits(tmp_path / "digits")
    overrides = [*TINY, "dataset=hf", f"dataset.path={tmp_path / 'digits'}",
                 "dataset.image_key=img", "dataset.label_key=digit",
                 "dataset.val_split=validation", "trainer.epochs=2", "trainer.num_workers=0",
                 f"trainer.feature_cache.dir={tmp_path / 'store'}"]
    results = []
    for name in ("first", "second"):
        train(compose_cfg(overrides), tmp_path / name)
        results.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    first, second = results
    assert first["status"] == second["status"] == "completed"
    assert first["feature_cache"]["head"]["splits"] == {"train": "extracted", "val": "extracted"}
    assert second["feature_cache"]["head"]["splits"] == {"train": "disk", "val": "disk"}
    assert [h["val_acc"] for h in first["history"]] == [h["val_acc"] for h in second["history"]]
