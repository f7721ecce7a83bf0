"""Frozen features for classical classifiers: the .npz export and the task=logreg baseline."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from transferlab.cli.features import main as features_main
from transferlab.config import load_config
from transferlab.infra.runtime import seed_everything
from transferlab.run import train
from transferlab.tools.features import run_features

from .conftest import TINY

# slow: extracts the features of whole data sets
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_features_export_every_split_with_labels_and_classes(tmp_path, capsys):
    out = tmp_path / "feats.npz"
    assert features_main([*TINY, "dataset.test_fraction=0.1", f"output={out}"]) == 0
    assert f"Features saved to: {out}" in capsys.readouterr().out
    data = np.load(out)
    assert list(data["classes"]) == [str(d) for d in range(10)]
    sizes = {s: len(data[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["test"] == pytest.approx(180, abs=2)
    for split in sizes:
        x = data[f"{split}_features"]
        assert x.dtype == np.float32 and x.shape == (sizes[split], x.shape[1])
        assert np.isfinite(x).all() and x.std() > 0
    assert set(np.unique(data["val_labels"])) == set(range(10))


def test_features_errors_are_one_line(tmp_path, capsys):
    assert features_main([*TINY, "dataset=image_folder", f"dataset.root={tmp_path}/no"]) == 2
    assert features_main(["backbone=nope"]) == 2
    assert features_main([*TINY, "trainer.epoch=3"]) == 2  # a Hydra override: Hydra's error
    assert features_main([*TINY, "--output", str(tmp_path / "f.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "trainer.epoch" in err[2]
    assert err[3] == "error: --output is not an option: write output=<value>"
    assert not (tmp_path / "f.npz").exists()


def test_logreg_task_is_recorded_like_any_run(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, "task=logreg", "task.C=0.5"])
    result = train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and result.best_val_acc == metrics["best"]["val_acc"]
    (record,) = metrics["history"]
    assert record["stage"] == "logreg" and 0.3 < record["val_acc"] <= 1.0
    assert metrics["final"]["val_acc"] == record["val_acc"]
    # the pickled model reproduces the recorded accuracy on the same frozen features
    saved = pickle.loads((tmp_path / "logreg.pkl").read_bytes())
    seed_everything(0, False)  # the tiny backbone's random weights, as the run drew them
    _, arrays = run_features(load_config(cfg))
    x, y = arrays["val"]
    assert float((saved["model"].predict(x) == y).mean()) == pytest.approx(record["val_acc"])
    assert (tmp_path / "tb").is_dir() and saved["classes"] == [str(d) for d in range(10)]


def test_an_unwritable_output_fails_before_extracting(monkeypatch, capsys):
    def extracting(*args, **kwargs):
        raise AssertionError("extracted before checking the output")

    monkeypatch.setattr("transferlab.tools.features.run_features", extracting)
    assert features_main(["output=/proc/transferlab/feats.npz", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output=/proc/transferlab/feats.npz: cannot write in") \
        and "\n" not in err
