"""k-fold cross-validation of the training split (``dataset.folds=K dataset.fold=i``): the folds
partition the (subset) training split, stratified, fixed by ``fold_seed`` across run seeds,
never touching the data's own val/test; the run records its fold; compare groups the folds."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest

from transferlab.cli import compare as compare_cli
from transferlab.config import load_config
from transferlab.data import DATASETS
from transferlab.errors import UserError
from transferlab.feature_cache.identity import dataset_identity
from transferlab.run import train
from transferlab.tools import compare

from .conftest import TINY, compose_train
from .test_sweep_views import _fake_run

FAKE = ["dataset=fake", "dataset.size=120", "dataset.num_classes=4", "dataset.image_size=8",
        "dataset.test_fraction=0.1"]


def _splits(overrides: list[str]):
    """The DataSplits of a fake data set (no transforms: only the items are looked at)."""
    run = load_config(compose_train([*FAKE, *overrides]))
    return DATASETS.builder(run.dataset.kind)(run.dataset, None, None)


def _indices(dataset) -> list[int]:
    return [index for _, index in dataset.items]


def _labels(dataset) -> list[int]:
    return [dataset.label_of(source, index) for source, index in dataset.items]


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_folds_partition_the_training_split_stratified_and_fixed_across_seeds():
    whole = _splits([])
    train, held = set(_indices(whole.train)), set(_indices(whole.val) + _indices(whole.test))
    vals = []
    for fold in range(3):
        splits = _splits(["dataset.folds=3", f"dataset.fold={fold}", "seed=0"])
        other_seed = _splits(["dataset.folds=3", f"dataset.fold={fold}", "seed=7"])
        fold_train, fold_val = _indices(splits.train), _indices(splits.val)
        assert (fold_train, fold_val) == (_indices(other_seed.train), _indices(other_seed.val))
        assert set(fold_train) | set(fold_val) == train and not set(fold_train) & set(fold_val)
        assert not (set(fold_val) | set(fold_train)) & held  # never the data's own val / test
        assert splits.test is None
        assert splits.folds == {"k": 3, "fold": fold, "fold_seed": 0, "train": len(fold_train),
                                "val": len(fold_val)}
        vals.append(splits.val)
    assert sorted(i for v in vals for i in _indices(v)) == sorted(train)  # disjoint, union
    per_fold = [Counter(_labels(v)) for v in vals]
    for label in range(4):
        counts = [c[label] for c in per_fold]
        assert max(counts) - min(counts) <= 1
    moved = _splits(["dataset.folds=3", "dataset.fold=0", "dataset.fold_seed=1"])
    assert _indices(moved.val) != _indices(vals[0])  # the fold seed draws them


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_subset_first_then_fold():
    subset = _splits(["dataset.samples_per_class=9", "dataset.subset_seed=3"])
    folds = [_splits(["dataset.samples_per_class=9", "dataset.subset_seed=3",
                      "dataset.folds=3", f"dataset.fold={i}"]) for i in range(3)]
    assert sorted(i for f in folds for i in _indices(f.val)) == sorted(_indices(subset.train))
    assert all(Counter(_labels(f.val)) == dict.fromkeys(range(4), 3) for f in folds)


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_two_folds_never_share_a_feature_cache_entry():
    a, b = (_splits(["dataset.folds=3", f"dataset.fold={i}"]) for i in (0, 1))
    assert dataset_identity(a.train) != dataset_identity(b.train)
    assert dataset_identity(a.val) != dataset_identity(b.val)
    digits = [load_config(compose_train(["dataset.folds=3", f"dataset.fold={i}"])).dataset
              for i in (0, 1)]
    da, db = (DATASETS.builder("digits")(d, None, None) for d in digits)
    assert dataset_identity(da.val) != dataset_identity(db.val)


@pytest.mark.parametrize("overrides, text", [
    (["dataset.fold=1"], "dataset.fold=1 needs dataset.folds=<K>"),
    (["dataset.folds=3"], "dataset.fold must be a fold in [0, 3)"),
    (["dataset.folds=3", "dataset.fold=3"], "dataset.fold must be a fold in [0, 3)"),
    (["dataset.folds=3", "dataset.fold=-1"], "dataset.fold must be a fold in [0, 3)"),
    (["dataset.folds=1", "dataset.fold=0"], "dataset.folds must be >= 2"),
])
def test_config_errors_are_one_line(overrides, text):
    with pytest.raises(UserError) as exc:
        load_config(compose_train(overrides))
    assert text in str(exc.value) and "\n" not in str(exc.value)


def test_too_few_images_per_class_for_the_folds_is_one_line():
    with pytest.raises(UserError) as exc:
        _splits(["dataset.samples_per_class=2", "dataset.folds=3", "dataset.fold=0"])
    assert "dataset.folds=3" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.slow
def test_a_fold_run_records_its_fold(tmp_path, one_thread):
    cfg = compose_train([*TINY, "dataset.samples_per_class=12", "dataset.folds=3",
                         "dataset.fold=1", "dataset.fold_seed=5"])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["folds"] == {"k": 3, "fold": 1, "fold_seed": 5, "train": 80, "val": 40}
    assert (metrics["data"]["train"], metrics["data"]["val"], metrics["data"]["test"]) == (
        80, 40, 0)


def test_compare_groups_folds_as_mean_and_std(tmp_path, capsys):
    accs = {"two_stage": [0.6, 0.8, 0.7], "linear_probe": [0.5, 0.55, 0.6]}
    job = 0
    for freeze, values in accs.items():
        for fold, acc in enumerate(values):
            _fake_run(tmp_path, f"{job}_x", [f"freeze={freeze}", "dataset.folds=3",
                                             f"dataset.fold={fold}"], [0.1, acc])
            job += 1
    groups = compare.group_folds(compare.find_runs([tmp_path]))
    assert len(groups) == 2
    for group in groups:
        freeze = next(o for o in group.overrides if o.startswith("freeze=")).partition("=")[2]
        assert group.runs == 3 and "dataset.fold=0,1,2" in group.overrides
        assert group.value("final_val_acc") == pytest.approx(statistics.fmean(accs[freeze]))
        assert group.spread["final_val_acc"] == pytest.approx(statistics.stdev(accs[freeze]))
    assert compare_cli.main([str(tmp_path), "group_folds=true", "plot=false"]) == 0
    out = capsys.readouterr().out
    assert f"{statistics.fmean(accs['two_stage']):.4f} ± " \
           f"{statistics.stdev(accs['two_stage']):.4f}" in out
    assert len(out.strip().splitlines()) == 4  # header, rule, one row per config
