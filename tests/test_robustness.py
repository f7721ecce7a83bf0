"""Robustness under shift (issue 26): ``transferlab-eval corruptions=`` (ImageNet-C-style
corruptions), ``wise=`` (WiSE-FT) and ``transferlab-export wise=``, ``dataset.extra_test``.

Real runs on tiny data: an LP-FT run of the tiny model (1 probe epoch, 1 fine-tuning epoch,
digits at 32 px), and a digits image-folder run with shifted test sets."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from statistics import fmean

import numpy as np
import pytest
import torch

from .conftest import TINY, compose_train

VAL = 90  # digits at val_fraction=0.05


@pytest.fixture(scope="module")
def lpft(tmp_path_factory):
    """(run dir, metrics.json) of a tiny LP-FT run: stage 1 probes the head, stage 2 trains
    everything; its wise_start.pt holds the weights between them."""
    from transferlab.run import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("lpft") / "run"
        train(compose_train([*TINY, "freeze=lp_ft", "freeze.probe_epochs=1",
                             "freeze.finetune_epochs=1", "optimizer.lr=0.03",
                             "dataset.samples_per_class=20", "dataset.val_fraction=0.05"]),
              run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def wise_eval(lpft) -> tuple[dict, str]:
    """(eval.json, the console) of the issue's two commands in one: a WiSE-FT curve of 5
    points with two corruptions at severity 3."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = evaluate(lpft[0], "wise=0:1:0.25", "corruptions=gaussian_noise,defocus_blur",
                          "severity=3")
    return report, out.getvalue()


def evaluate(run_dir, *args: str) -> dict:
    from transferlab.cli.evaluate import main

    assert main([f"run={run_dir}", *args]) == 0
    return json.loads((run_dir / "eval.json").read_text())


def scalars(run_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


# -- fast: the arithmetic --------------------------------------------------------------------
def test_interpolation_mixes_floats_and_keeps_the_final_integer_buffers():
    from torch import nn

    from transferlab.run.wise import interpolate

    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    final = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    final.train()(torch.randn(8, 3))  # running statistics and num_batches_tracked move
    a, b = start.state_dict(), final.state_dict()
    assert int(b["1.num_batches_tracked"]) == 1 and int(a["1.num_batches_tracked"]) == 0
    half = interpolate(a, b, 0.5)
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(half[key], (a[key] + b[key]) / 2)
        assert not torch.equal(half[key], b[key])
    assert int(half["1.num_batches_tracked"]) == 1  # integers: the final's
    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) for k in a if a[k].is_floating_point())
    assert all(torch.equal(interpolate(a, b, 1.0)[k], b[k]) for k in b)


def test_alpha_grids():
    from transferlab.choices import alphas

    assert alphas("0:1:0.25") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(alphas("0:1:0.1")) == 11 and alphas("0:1:0.1")[3] == 0.3
    assert alphas("0,0.5,1") == (0.0, 0.5, 1.0) and alphas("0.4") == (0.4,)
    for bad, needle in (("0:1:0.3", "whole steps"), ("0:2:0.5", "from 0 to 1"),
                        ("1:0:0.5", "whole steps"), ("0:1", "start:stop:step"),
                        ("0,0", "twice"), ("x", "a number")):
        with pytest.raises(ValueError, match=needle):
            alphas(bad)


@pytest.mark.slow  # imports the data modules
def test_without_the_robust_extra_corruptions_is_one_line(monkeypatch):
    import sys

    from transferlab.errors import UserError
    from transferlab.tools.corruptions import corruption_names

    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # as if not installed
    with pytest.raises(UserError) as caught:
        corruption_names("all")
    assert str(caught.value) == ("corruptions= needs the imagecorruptions package: "
                                 "pip install 'transferlab[robust]'")


# -- corruptions ---------------------------------------------------------------------------------
@pytest.mark.slow  # imports imagecorruptions (numba)
def test_corrupted_images_are_seeded_per_image_and_grow_with_severity():
    from transferlab.backbones import InputSpec
    from transferlab.config import AugmentConfig, DatasetConfig
    from transferlab.data import build_splits
    from transferlab.data.transforms import eval_stages
    from transferlab.tools.corruptions import CorruptedImages

    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    fixed, tail = eval_stages(spec, 32, 1.0)
    dataset = DatasetConfig(name="digits", kind="digits", image_size=64, crop_pct=1.0)
    base = build_splits(dataset, AugmentConfig(name="none"), spec, 32, fixed).val
    clean = torch.stack([tail(base[i][0]) for i in range(8)])
    state = np.random.get_state()

    def images(name, severity, seed):
        data = CorruptedImages(base, name, severity, seed, tail)
        return torch.stack([data[i][0] for i in range(8)])

    noisy = images("gaussian_noise", 3, 0)
    assert torch.equal(noisy, images("gaussian_noise", 3, 0))  # a rerun sees the same images
    assert not torch.equal(noisy, images("gaussian_noise", 3, 1))  # another seed, others
    assert not torch.equal(noisy[0], noisy[1] - clean[1] + clean[0])  # each image its own noise
    changes = [float((images(name, s, 0) - clean).abs().mean())
               for name in ("gaussian_noise", "defocus_blur") for s in (1, 5)]
    assert 0 < changes[0] < changes[1] and 0 < changes[2] < changes[3]
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), state, strict=True)
               if isinstance(x, np.ndarray))  # NumPy's global random state is left alone


@pytest.mark.slow
def test_corruption_accuracies_per_severity(lpft, wise_eval, capsys):
    run_dir, metrics = lpft
    three = wise_eval[0]["corruptions"]  # the command: severity=3
    assert three["names"] == ["gaussian_noise", "defocus_blur"] and three["severities"] == [3]
    assert all(set(row) == {"3"} for row in three["accuracy"].values())
    assert three["mean_accuracy"] == pytest.approx(fmean(
        row["3"] for row in three["accuracy"].values()), abs=1e-12)
    report = evaluate(run_dir, "corruptions=defocus_blur", "severity=1,5")
    grid = report["corruptions"]
    assert report["samples"] == VAL
    assert report["accuracy"] == pytest.approx(metrics["best"]["val_acc"], abs=1e-9)
    acc = grid["accuracy"]
    assert set(acc) == {"defocus_blur"} and set(acc["defocus_blur"]) == {"1", "5"}
    assert grid["mean_accuracy"] == pytest.approx(fmean(acc["defocus_blur"].values()),
                                                  abs=1e-12)
    assert grid["per_corruption"]["defocus_blur"] == grid["mean_accuracy"]
    assert grid["clean_accuracy"] == report["accuracy"]
    # severity 3 lies between 1 and 5 in loss, for the same seeded images
    loss = grid["loss"]["defocus_blur"]
    assert loss["1"] < wise_eval[0]["corruptions"]["loss"]["defocus_blur"]["3"] < loss["5"]
    # severity 5 costs accuracy and raises the loss; every cell is a count of VAL images
    for name in acc:
        assert acc[name]["5"] < min(acc[name]["1"], report["accuracy"])
        assert grid["loss"][name]["5"] > grid["loss"][name]["1"]
        assert all(round(v * VAL) == pytest.approx(v * VAL, abs=1e-6) for v in acc[name].values())
    assert "imagecorruptions" in grid["package"]
    out = capsys.readouterr().out
    assert f"mean corruption accuracy {grid['mean_accuracy']:.4f}" in out
    assert "sev 1" in out and "sev 5" in out
    tb = scalars(run_dir, "eval/val/corruptions/defocus_blur/acc")  # step: the severity
    assert [tb[1], tb[5]] == pytest.approx([acc["defocus_blur"]["1"], acc["defocus_blur"]["5"]])
    assert (run_dir / "eval_corruptions.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_corruption_mistakes_are_one_line(lpft, tiny_run, capsys):
    from transferlab.cli.evaluate import main

    run_dir, _ = lpft
    for args, needle in (
            (["corruptions=gausian_noise"], "did you mean 'gaussian_noise'"),
            (["corruptions=all", "severity=6"], "distinct severities from 1 to 5"),
            (["severity=3"], "severity= goes with corruptions="),
            (["corruptions=all", "tta=flip"], "drop tta="),
            (["wise=0:1:0.3"], "whole steps")):
        assert main([f"run={run_dir}", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    from transferlab.errors import UserError
    from transferlab.tools.corruptions import check_size

    with pytest.raises(UserError, match="at least 32 px .* this run's input is 16 px"):
        check_size(16)  # (imagecorruptions refuses smaller images)
    # a linear probe trains no backbone: no start weights, and wise= says why
    assert not (tiny_run / "wise_start.pt").exists()
    assert main([f"run={tiny_run}", "wise=0:1:0.5"]) == 2
    assert "has no wise_start.pt" in capsys.readouterr().err


# -- WiSE-FT ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wise_curve_runs_from_the_probed_weights_to_the_checkpoint(lpft, wise_eval):
    run_dir, metrics = lpft
    probe, finetune = metrics["history"]
    assert probe["stage"] == "probe" and finetune["stage"] == "finetune"
    report, out = wise_eval
    points = report["wise"]["points"]
    assert [p["alpha"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert report["wise"]["start"]["stage"] == "finetune" and report["wise"]["start"]["epoch"] == 1
    # alpha 1: the checkpoint itself, exactly; alpha 0: the probed model the run measured
    assert points[-1]["accuracy"] == report["accuracy"]
    assert points[-1]["loss"] == report["loss"]
    assert points[-1]["corruption_mean_accuracy"] == report["corruptions"]["mean_accuracy"]
    assert points[0]["accuracy"] == pytest.approx(probe["val_acc"], abs=1e-9)
    assert points[0]["loss"] == pytest.approx(probe["val_loss"], abs=1e-4)
    assert len({p["loss"] for p in points}) == 5  # every alpha is another model
    assert set(report["corruptions"]["accuracy"]) == {"gaussian_noise", "defocus_blur"}
    assert all(set(r) == {"3"} for r in report["corruptions"]["accuracy"].values())
    assert "WiSE-FT" in out and f"{points[2]['accuracy']:8.4f}" in out
    assert "mean corruption accuracy" in out
    assert scalars(run_dir, "eval/val/wise/acc") == pytest.approx(
        {round(p["alpha"] * 100): p["accuracy"] for p in points})
    assert (run_dir / "eval_wise.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_export_writes_the_interpolated_model(lpft, wise_eval, tmp_path, capsys):
    from transferlab.cli.export import main
    from transferlab.infra.checkpoint import load_checkpoint
    from transferlab.run.saved import checkpoint_config
    from transferlab.tools.evaluate import eval_dataset

    run_dir, _ = lpft
    curve = {p["alpha"]: p["accuracy"] for p in wise_eval[0]["wise"]["points"]}
    out = tmp_path / "export"
    assert main([f"run={run_dir}", "wise=0.5", "format=torchscript", "verify=false",
                 f"output={out}"]) == 0
    assert "WiSE-FT alpha 0.5" in capsys.readouterr().out
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["run"]["wise"]["alpha"] == 0.5
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    from transferlab.backbones import build_backbone

    run = checkpoint_config(ckpt)
    dataset = eval_dataset(run, build_backbone(run.backbone), 32, "val", ckpt["classes"])
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        predicted = torch.jit.load(str(out / "model.ts"))(images).argmax(1)
    assert int((predicted == labels).sum()) / len(labels) == pytest.approx(curve[0.5], abs=1e-12)


# -- dataset.extra_test ----------------------------------------------------------------------------
def digits_folders(root, per_class: int = 24, train: int = 16) -> None:
    """root/{train,val}/<digit>/*.png from scikit-learn's digits."""
    from PIL import Image

    from transferlab.data.digits import digits_images

    images, labels = digits_images()
    seen: dict[int, int] = {}
    for i, label in enumerate(int(y) for y in labels):
        n = seen.get(label, 0)
        if n >= per_class:
            continue
        seen[label] = n + 1
        folder = root / ("train" if n < train else "val") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


@pytest.mark.slow
def test_extra_test_sets_beside_val(tmp_path, one_thread):
    from transferlab.run import train
    from transferlab.run.predictions import load_predictions

    data = tmp_path / "digits"
    digits_folders(data, per_class=12, train=8)
    three = tmp_path / "three"  # a shifted set with some of the classes
    for digit in "012":
        shutil.copytree(data / "val" / digit, three / digit)
    run_dir = tmp_path / "run"
    overrides = [*TINY, "dataset=image_folder", f"dataset.root={data}", "optimizer.lr=0.03",
                 f"+dataset.extra_test={{copy: {data / 'val'}, three: {three}}}"]
    train(compose_train(overrides), run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    extra, best = metrics["extra_test"], metrics["best"]
    assert set(extra) == {"copy", "three"}
    # a copy of val is val: best.pt's accuracy and loss
    assert extra["copy"]["acc"] == best["val_acc"] and extra["copy"]["samples"] == 40
    assert extra["copy"]["loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert extra["copy"]["epoch"] == best["epoch"] and extra["copy"]["checkpoint"] == "best"
    # three of the classes keep their labels: val's predictions on them
    val = load_predictions(run_dir / "predictions_val.npz")
    keep = val.targets <= 2
    assert extra["three"]["samples"] == int(keep.sum()) == 12
    assert extra["three"]["acc"] == pytest.approx(float(val.correct[keep].mean()), abs=1e-12)
    assert scalars(run_dir, "extra_test/three/acc") == pytest.approx(
        {best["epoch"]: extra["three"]["acc"]})
    # transferlab-eval takes the set by name, or one added at eval time (the run's others kept)
    report = evaluate(run_dir, "split=three")
    assert (report["split"], report["accuracy"]) == ("three", extra["three"]["acc"])
    again = evaluate(run_dir, f"dataset.extra_test.again={three}", "split=again")
    assert again["accuracy"] == extra["three"]["acc"] and again["samples"] == 12
    assert evaluate(run_dir, f"dataset.extra_test.again={three}", "split=copy")["accuracy"] == (
        best["val_acc"])
    from transferlab.cli.evaluate import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([f"run={run_dir}", "split=night"]) == 2
    assert err.getvalue().strip() == (
        "error: split=night: the run has no such split: give val, test or one of its "
        "dataset.extra_test sets (copy, three), or add one with "
        "dataset.extra_test.night=<folder of class folders>")


def test_extra_test_class_folders_must_be_the_runs(tmp_path):
    from PIL import Image

    from transferlab.data.extra_test import extra_test_set
    from transferlab.errors import UserError

    classes = [str(d) for d in range(10)]
    for folder in ("7", "3"):
        (tmp_path / "ok" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ok" / folder / "a.png")
    some = extra_test_set("ok", str(tmp_path / "ok"), classes, None)
    assert [label for _, label in some.samples] == [3, 7]  # the run's labels, not 0 and 1
    (tmp_path / "ok" / "seven").mkdir()
    with pytest.raises(UserError) as caught:
        extra_test_set("odd", str(tmp_path / "ok"), classes, None)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("dataset.extra_test.odd: ")
    assert "class folder 'seven', not a class of the run" in message
    with pytest.raises(UserError, match="does not exist"):
        extra_test_set("gone", str(tmp_path / "gone"), classes, None)
