"""``transferlab-compare``'s intervals and pairwise verdicts, from predictions files written
as runs write them (:mod:`transferlab.run.predictions`) beside fake metrics.json records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from transferlab.cli import compare as compare_cli
from transferlab.run.predictions import (
    EVAL_PREDICTIONS,
    Predictions,
    load_predictions,
    predictions_file,
    save_predictions,
)
from transferlab.tools import compare, stats

N = 240
LABELS = np.arange(N) % 4


def _fake_run(root: Path, name: str, overrides: list[str], correct: np.ndarray | None,
              identity: str = "val-A", file: str = predictions_file("val"),
              header: dict | None = None, epoch: int = 2) -> Path:
    """A completed run whose best epoch is ``epoch`` and, unless ``correct`` is None, its
    predictions file (right where ``correct`` says)."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    acc = float(correct.mean()) if correct is not None else 0.5
    record = {"epoch": epoch, "val_acc": acc, "val_loss": 1 - acc}
    history = [{"epoch": e, "stage": "head", "train_loss": 1.0, "train_acc": 0.5,
                "val_loss": 1 - acc, "val_acc": acc} for e in range(1, epoch + 1)]
    (job / "metrics.json").write_text(json.dumps(
        {"status": "completed", "history": history, "best": record, "final": record,
         "params": {"trainable": 10}, "wall_seconds": 1.0}))
    if correct is not None:
        predicted = np.where(correct, LABELS, (LABELS + 1) % 4)
        pred = Predictions(LABELS.copy(), predicted, np.where(correct, 0.9, 0.1), 0.3)
        save_predictions(job / file, pred, {"checkpoint": "best", "epoch": epoch,
                                            "weights": "raw", "split": "val",
                                            "identity": identity, **(header or {})})
    return job


def _correct(right: int, seed: int) -> np.ndarray:
    out = np.zeros(N, dtype=bool)
    out[:right] = True
    return np.random.default_rng(seed).permutation(out)


def test_a_predictions_file_round_trips_atomically_in_the_splits_order(tmp_path):
    pred = Predictions(np.array([2, 0, 1]), np.array([2, 1, 1]),
                       np.array([0.7, 0.2, 0.6], dtype=np.float32), 0.5)
    path = save_predictions(tmp_path / "p.npz", pred, {"split": "val", "epoch": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]  # no temporary file left
    back = load_predictions(path)
    assert back.targets.tolist() == [2, 0, 1] and back.predicted.tolist() == [2, 1, 1]
    assert back.label_prob.tolist() == pytest.approx([0.7, 0.2, 0.6])
    assert back.header["accuracy"] == pytest.approx(2 / 3) and back.header["epoch"] == 3
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable predictions"):
        load_predictions(tmp_path / "bad.npz")


def test_seed_groups_get_intervals_and_a_verdict(tmp_path, capsys):
    for seed in range(3):
        _fake_run(tmp_path, f"{2 * seed}_a", ["optimizer.lr=0.01", f"seed={seed}"],
                  _correct(216, seed))  # 90 %
        _fake_run(tmp_path, f"{2 * seed + 1}_b", ["optimizer.lr=0.001", f"seed={seed}"],
                  _correct(168, 10 + seed))  # 70 %
    _fake_run(tmp_path, "9_old", ["optimizer.lr=0.1", "seed=0"], None)  # no predictions
    report = tmp_path / "r.md"
    assert compare_cli.main([str(tmp_path), "group_seeds=true", "plot=false",
                             f"report={report}", "tensorboard=true"]) == 0
    out = capsys.readouterr().out
    header, _, first, second, third = out.split("\n\n")[0].splitlines()
    assert re.search(r"best val acc +95% CI +best epoch", header), header
    group_a = np.stack([_correct(216, s) for s in range(3)])
    iv = stats.accuracy_interval(group_a)
    assert "optimizer.lr=0.01 " in first and f"[{iv.low:.4f}, {iv.high:.4f}]" in first
    assert "optimizer.lr=0.1" in third and " n/a " in third
    line = next(ln for ln in out.splitlines() if " − " in ln)
    assert re.fullmatch(r"  optimizer\.lr=0\.01 − optimizer\.lr=0\.001 = \+20\.0 points, 95 % CI "
                        r"\[\+\d+\.\d, \+\d+\.\d\], p < 0\.001: optimizer\.lr=0\.01 is better "
                        r"\(paired bootstrap over 3 seeds and 240 images\)", line), line
    assert "1 row(s) without predictions" in out
    assert f"- {line.strip()}" in report.read_text()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    (text,) = [t for t in events.Tags()["tensors"] if t.startswith("compare/differences")]
    assert line.strip().encode() in events.Tensors(text)[0].tensor_proto.string_val[0]


def test_two_runs_get_mcnemar_and_a_different_split_no_test(tmp_path, capsys):
    a, b = _correct(200, 0), _correct(200, 0).copy()
    b[np.flatnonzero(a)[:3]] = False  # 3 images apart: not distinguishable
    _fake_run(tmp_path, "0_a", ["optimizer.lr=0.1"], a)
    _fake_run(tmp_path, "1_b", ["optimizer.lr=0.2"], b)
    _fake_run(tmp_path, "2_c", ["optimizer.lr=0.3"], _correct(100, 1), identity="val-B")
    assert compare_cli.main([str(tmp_path), "plot=false"]) == 0
    out = capsys.readouterr().out
    assert ("optimizer.lr=0.1 − optimizer.lr=0.2 = +1.2 points, 95 % CI [+0.0, +2.9], "
            "p = 0.25: not distinguishable (McNemar exact, 3 vs 0 discordant of 240 images)"
            ) in out.replace("[−0.0", "[+0.0")
    assert "optimizer.lr=0.1 vs optimizer.lr=0.3: not on the same val images" in out
    assert compare_cli.main([str(tmp_path), "plot=false", "format=csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].endswith("val_acc_ci_low,val_acc_ci_high")
    low, high = (float(x) for x in rows[1].split(",")[-2:])
    assert low < 200 / N < high


def test_stale_and_tta_predictions_are_not_used_but_a_plain_eval_is(tmp_path, capsys):
    _fake_run(tmp_path, "0_stale", ["seed=0"], _correct(200, 0), epoch=2,
              header={"epoch": 1})  # written before a resume moved the best epoch
    _fake_run(tmp_path, "1_tta", ["seed=1"], _correct(200, 1), file=EVAL_PREDICTIONS,
              header={"tta": "flip", "dataset_overrides": {}})
    _fake_run(tmp_path, "2_eval", ["seed=2"], _correct(200, 2), file=EVAL_PREDICTIONS,
              header={"tta": "none", "dataset_overrides": {}})
    runs = {r.path.name: r for r in compare.find_runs([tmp_path])}
    assert runs["0_stale"].scored is None and runs["1_tta"].scored is None
    assert runs["2_eval"].scored is not None
    assert compare_cli.main([str(tmp_path), "plot=false"]) == 0
    assert "2 row(s) without predictions" in capsys.readouterr().out


def test_fold_groups_put_their_folds_images_side_by_side(tmp_path):
    for fold in range(2):
        for lr, right in (("0.1", 200), ("0.2", 150)):
            _fake_run(tmp_path, f"{lr}_{fold}", [f"optimizer.lr={lr}", f"dataset.fold={fold}"],
                      _correct(right, fold), identity=f"fold-{fold}")
    groups = compare.group_folds(compare.find_runs([tmp_path]))
    assert [g.scored.correct.shape for g in groups] == [(1, 2 * N), (1, 2 * N)]
    best = next(g for g in groups if "optimizer.lr=0.1" in g.overrides)
    assert best.scored.interval.estimate == pytest.approx(200 / N)
    (line,) = [ln for ln in compare.statistics_lines(groups) if " − " in ln or " vs " in ln]
    assert "McNemar exact" in line and f"of {2 * N} images" in line


def test_many_rows_compare_the_best_with_each_other_under_holm(tmp_path):
    for k, right in enumerate((230, 200, 195, 190, 120)):
        _fake_run(tmp_path, f"{k}_r", [f"optimizer.lr=0.{k + 1}"], _correct(right, k))
    runs = compare.sort_runs(compare.find_runs([tmp_path]), "best_val_acc")
    lines = [ln.strip() for ln in compare.statistics_lines(runs)[1:]]
    assert [ln.split(" = ")[0] for ln in lines] == [
        f"optimizer.lr=0.1 − optimizer.lr=0.{k}" for k in (2, 3, 4, 5)]
    assert all("after Holm over 4 pairs" in ln for ln in lines)
    assert all(ln.split(": ")[1].startswith("optimizer.lr=0.1 is better") for ln in lines)
