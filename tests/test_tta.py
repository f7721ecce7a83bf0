"""Test-time augmentation (transferlab.tools.tta) and its ``tta=`` key in transferlab-eval and
-predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from transferlab.backbones import InputSpec
from transferlab.cli.evaluate import main as eval_main
from transferlab.cli.predict import main as predict_main
from transferlab.run import train
from transferlab.tools.predict import imagenet_predictor
from transferlab.tools.tta import VIEWS, average_log_probs, mean_log_probs, views_transform

from .conftest import TINY, TINY_SIZE, compose_train, tiny_model
from .test_predict import CATS, save_digits

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def spec(size: int = TINY_SIZE, crop_pct: float = 0.875) -> InputSpec:
    return InputSpec(size=size, mean=MEAN, std=STD, interpolation="bilinear",
                     crop_pct=crop_pct)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) -> float, normalised as the eval transform does."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (image.float() / 255 - mean) / std


@pytest.fixture
def tiny():
    model, _ = tiny_model()
    return model.eval()


# -- the mechanics, on the tiny model ------------------------------------------------------------
def test_flip_of_a_mirror_symmetric_image_is_no_tta(tiny, one_thread):
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (TINY_SIZE, TINY_SIZE // 2, 3), dtype=np.uint8)
    symmetric = Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))
    # crop_pct 1: the eval resize and crop keep the 32 x 32 image as it is (still symmetric)
    none = views_transform("none", spec(crop_pct=1.0), TINY_SIZE)(symmetric)
    flip = views_transform("flip", spec(crop_pct=1.0), TINY_SIZE)(symmetric)
    assert none.shape == (1, 3, TINY_SIZE, TINY_SIZE) and flip.shape == (2, 3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(flip[0], none[0]) and torch.equal(flip[1], none[0])
    with torch.no_grad():
        plain = torch.log_softmax(tiny(none), dim=-1)
        with_none = mean_log_probs(tiny, none[None])
        with_flip = mean_log_probs(tiny, flip[None])
    assert torch.equal(with_none, plain)  # one view: exactly the prediction without TTA
    torch.testing.assert_close(with_flip, plain, rtol=0, atol=1e-6)


def test_flip_of_an_asymmetric_image_averages_the_two_probabilities(tiny, one_thread):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    views = views_transform("flip", spec(), TINY_SIZE)(image)
    with torch.no_grad():
        p_image = torch.softmax(tiny(views[:1]), -1)
        p_mirror = torch.softmax(tiny(views[0].flip(-1)[None]), -1)
        p_tta = mean_log_probs(tiny, views[None]).exp()
    assert not torch.allclose(p_image, p_mirror, atol=1e-4)  # the mirror is another input
    torch.testing.assert_close(p_tta, (p_image + p_mirror) / 2, rtol=0, atol=1e-6)


def test_five_crop_views_and_their_average_by_hand(tiny, one_thread):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (60, 75, 3), dtype=np.uint8)  # H x W
    image = Image.fromarray(pixels)
    s = 32
    views = views_transform("five_crop", spec(s, crop_pct=0.8), s)(image)
    assert views.shape == (5, 3, s, s) and views.dtype == torch.float32
    # by hand: the eval resize (short side 32 / 0.8 = 40 -> 40 x 50), then the four corners
    # (torchvision's order: top-left, top-right, bottom-left, bottom-right) and the centre
    resized = T.Resize(40, antialias=True)(T.ToImage()(image))
    assert resized.shape == (3, 40, 50)
    top, left = (40 - s + 1) // 2, (50 - s + 1) // 2  # torchvision's centre crop rounding
    crops = [resized[:, :s, :s], resized[:, :s, -s:], resized[:, -s:, :s], resized[:, -s:, -s:],
             resized[:, top:top + s, left:left + s]]
    for view, crop in zip(views, crops, strict=True):
        torch.testing.assert_close(view, normalise(crop), rtol=0, atol=1e-6)
    assert len({tuple(v.flatten()[:50].tolist()) for v in views}) == 5  # five different crops

    with torch.no_grad():
        probs = [torch.softmax(tiny(normalise(c)[None]), -1)[0] for c in crops]
        by_hand = torch.stack(probs).mean(0)
        tta = mean_log_probs(tiny, views[None]).exp()[0]
    torch.testing.assert_close(tta, by_hand, rtol=0, atol=1e-6)

    ten = views_transform("ten_crop", spec(s, crop_pct=0.8), s)(image)
    assert ten.shape == (10, 3, s, s) and VIEWS["ten_crop"] == 10
    torch.testing.assert_close(ten[:5], views, rtol=0, atol=0)
    # then the five crops of the mirrored image: the mirrors of the five (left and right swap)
    torch.testing.assert_close(ten[5:], views[[1, 0, 3, 2, 4]].flip(-1), rtol=0, atol=0)


def test_average_log_probs_is_the_log_of_the_mean_probability():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [-3.0, 1.0, 0.5]]])  # 1 image, 2 views, 3 classes
    expected = torch.softmax(logits, -1).mean(1).log()
    torch.testing.assert_close(average_log_probs(logits), expected)
    logit_mean = torch.log_softmax(logits.mean(1), -1)  # another answer: not what TTA gives
    assert not torch.allclose(average_log_probs(logits), logit_mean, atol=1e-2)
    extreme = torch.tensor([[[200.0, 0.0], [0.0, 200.0]]])  # probabilities of 1e-87: no -inf
    torch.testing.assert_close(average_log_probs(extreme), torch.full((1, 2), np.log(0.5)))


# -- real photos, the ImageNet model of the default backbone --------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(skimage_data.coffee()).save(folder / "coffee.png")
    return folder


@pytest.fixture(scope="module")
def lite0():
    return imagenet_predictor("efficientnet_lite0", None)


@pytest.mark.slow
def test_flip_and_five_crop_on_real_photos(lite0, photos, one_thread):
    classes = lite0.classes
    images = [Image.open(photos / name).convert("RGB") for name in ("chelsea.png", "coffee.png")]
    probs = {}
    with torch.no_grad():
        for mode in ("none", "flip", "five_crop"):
            base = lite0.transform  # the eval views of the model's input spec
            views = views_transform(mode, base.spec, base.image_size, base.crop_pct)
            probs[mode] = mean_log_probs(lite0.model, torch.stack([views(i) for i in images]))\
                .exp()
    for mode in ("flip", "five_crop"):
        assert (probs[mode] - probs["none"]).abs().max() > 1e-3, mode  # TTA changes the numbers
        torch.testing.assert_close(probs[mode].sum(-1), torch.ones(2))
        cat, coffee = (classes[i] for i in probs[mode].argmax(-1).tolist())
        assert cat in CATS, (mode, cat)  # ... but not what a sane model sees
        assert "espresso" in coffee or "cup" in coffee, (mode, coffee)


def test_predict_with_tta_says_so(photos, capsys, one_thread):
    assert predict_main(["backbone=efficientnet_lite0", "top_k=2", "tta=flip",
                         str(photos / "chelsea.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tta=flip: probabilities averaged over 2 views per image"
    assert lines[1].endswith("chelsea.png") and lines[2].split(maxsplit=1)[1] in CATS


# -- the commands, on a tiny run -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch run of the tiny random timm model on digits (32 px)."""
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_train(TINY), run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["flip", "five_crop"])
def test_eval_with_tta_writes_it_in_the_reports(tta, tiny_run, capsys, one_thread):
    # digits has crop_pct 1 (its 32 px resize is the image: five equal crops); 0.8: 40 px
    args = [f"run={tiny_run}", "device=cpu", "dataset.crop_pct=0.8"]
    assert eval_main([*args, f"tta={tta}"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tiny_run / "eval.json").read_text())
    assert report["tta"] == tta
    assert f"tta={tta}: probabilities averaged over {VIEWS[tta]} views per image" \
        in out.splitlines()[0]
    assert f"eval/val_tta_{tta}/confusion_matrix" in out
    assert report["samples"] > 0 and 0.0 <= report["accuracy"] <= 1.0
    assert np.isfinite(report["loss"])

    assert eval_main(args) == 0
    plain = json.loads((tiny_run / "eval.json").read_text())
    assert plain["tta"] == "none" and "tta=none" in capsys.readouterr().out.splitlines()[0]
    assert plain["samples"] == report["samples"]
    assert plain["loss"] != report["loss"]  # other inputs, other numbers


@pytest.mark.slow  # it needs the session's tiny trained run (the fast tier stays under a minute)
def test_predict_csv_of_a_run_has_the_tta(tiny_run, tmp_path, capsys, one_thread):
    save_digits(tmp_path / "digits", 3)
    out_csv = tmp_path / "preds.csv"
    assert predict_main([f"run={tiny_run}", "tta=five_crop", f"output={out_csv}", "device=cpu",
                         str(tmp_path / "digits")]) == 0
    assert capsys.readouterr().out.startswith("tta=five_crop: probabilities averaged over 5")
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {row["tta"] for row in rows} == {"five_crop"}
    for row in rows:
        assert abs(sum(float(row[str(d)]) for d in range(10)) - 1.0) < 1e-4


@pytest.mark.parametrize("main, args", [
    (eval_main, ["run=somewhere"]),
    (predict_main, ["backbone=efficientnet_lite0", "cat.jpg"]),
])
def test_an_invalid_tta_is_one_line_exit_2(main, args, capsys):
    assert main([*args, "tta=flipp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid value for tta: 'flipp'")
    assert "did you mean 'flip'" in err and "none, flip, five_crop, ten_crop" in err


@pytest.mark.parametrize("main", [eval_main, predict_main])
def test_help_shows_the_tta_key_and_an_example(main, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "tta=none|flip|five_crop|ten_crop" in out
    assert any("tta=" in line for line in out.split("examples:")[1].splitlines())
