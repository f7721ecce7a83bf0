"""transferlab-predict: ImageNet top-k with a pretrained backbone, and a trained run's CSV."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from transferlab.cli.predict import main
from transferlab.data.digits import digits_images

from .conftest import ROOT

CATS = ("tabby", "tiger cat", "Egyptian cat", "Persian cat")


def top_k_by_image(stdout: str) -> dict[str, list[str]]:
    """Parse the printed blocks: a path line, then ``  probability  class`` lines."""
    blocks: dict[str, list[str]] = {}
    current = ""
    for line in stdout.splitlines():
        if line.startswith("  "):
            blocks[current].append(line.split(maxsplit=1)[1])
        elif line:
            current = os.path.basename(line)
            blocks[current] = []
    return blocks


def test_imagenet_top5_on_real_photos_skips_a_text_file(tmp_path, capsys, one_thread):
    skimage_data = pytest.importorskip("skimage.data")
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "chelsea.png")
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.png")
    (tmp_path / "notes.txt").write_text("not an image\n")

    assert main(["backbone=efficientnet_lite0", "top_k=5", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    top5 = top_k_by_image(out)
    assert set(top5) == {"chelsea.png", "coffee.png"}
    assert all(len(names) == 5 for names in top5.values())
    assert any(name in top5["chelsea.png"] for name in CATS), top5["chelsea.png"]
    assert "espresso" in top5["coffee.png"] or "cup" in top5["coffee.png"], top5["coffee.png"]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 1 file" in warnings[0] and "notes.txt" in warnings[0]


def save_digits(folder, count: int) -> None:
    images, labels = digits_images()
    folder.mkdir()
    for i in range(count):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}_{labels[i]}.png")


@pytest.mark.slow
def test_trained_run_writes_one_csv_row_per_image(tiny_run, tmp_path, capsys, one_thread):
    save_digits(tmp_path / "digits", 5)
    (tmp_path / "digits" / "README.md").write_text("# not an image\n")
    out_csv = tmp_path / "out" / "preds.csv"

    code = main([f"run={tiny_run}", "checkpoint=last", f"output={out_csv}", "device=cpu",
                 str(tmp_path / "digits")])
    out, err = capsys.readouterr()
    assert code == 0 and str(out_csv) in out
    assert "skipped 1 file" in err and "README.md" in err

    classes = [str(d) for d in range(10)]
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert list(rows[0]) == ["path", "label", "probability", "tta", *classes]
    assert {row["tta"] for row in rows} == {"none"}
    for row in rows:
        probs = [float(row[c]) for c in classes]
        assert row["label"] in classes
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-4)
        assert float(row["probability"]) == max(probs) == float(row[row["label"]])


@pytest.mark.slow  # it needs the session's tiny trained run (the fast tier stays under a minute)
def test_trained_run_default_csv_is_in_the_run_dir(tiny_run, tmp_path, capsys, one_thread):
    save_digits(tmp_path / "digits", 2)
    assert main([f"run={tiny_run}", str(tmp_path / "digits" / "0_0.png")]) == 0
    assert str(tiny_run / "predictions.csv") in capsys.readouterr().out
    with (tiny_run / "predictions.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


@pytest.mark.slow  # it needs the session's tiny trained run (the fast tier stays under a minute)
@pytest.mark.parametrize("how", ["nothing decodes", "interrupted", "fails"])
def test_an_earlier_csv_survives_a_predict_that_does_not_finish(how, tiny_run, tmp_path,
                                                                capsys, monkeypatch, one_thread):
    save_digits(tmp_path / "digits", 3)
    out_csv = tmp_path / "preds.csv"
    out_csv.write_text("path,label\nearlier.png,3\n")
    if how == "nothing decodes":  # readable headers, undecodable data
        monkeypatch.setattr("transferlab.tools.predict.read_rgb", lambda path: None)
    else:
        error = KeyboardInterrupt if how == "interrupted" else RuntimeError("disk gone")
        calls = {"n": 0}
        original = __import__("transferlab.tools.predict", fromlist=["read_rgb"]).read_rgb

        def flaky(path):
            calls["n"] += 1
            if calls["n"] == 3:
                raise error
            return original(path)

        monkeypatch.setattr("transferlab.tools.predict.read_rgb", flaky)
    args = [f"run={tiny_run}", f"output={out_csv}", "batch_size=1", str(tmp_path / "digits")]
    if how == "fails":
        with pytest.raises(RuntimeError):
            main(args)
    else:
        assert main(args) == (2 if how == "nothing decodes" else 130)
    assert out_csv.read_text() == "path,label\nearlier.png,3\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_no_image_at_all_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image\n")
    assert main(["backbone=efficientnet_lite0", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no image to classify")


@pytest.mark.slow  # a process of its own
def test_missing_path_is_one_error_line_without_traceback(tmp_path):
    missing = tmp_path / "no_such_folder"
    proc = subprocess.run([sys.executable, "-m", "transferlab.cli.predict",
                           "backbone=efficientnet_lite0", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: input path {missing} does not exist"]
    assert "Traceback" not in proc.stderr


def test_a_path_with_an_equals_sign_is_an_image_not_a_key(tmp_path, capsys, one_thread):
    folder = tmp_path / "photos" / "0_freeze=x"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red=1.png")
    assert main(["backbone=efficientnet_lite0", "top_k=2", str(folder / "red=1.png")]) == 0
    assert top_k_by_image(capsys.readouterr().out).keys() == {"red=1.png"}


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_a_backbone_takes_its_weights_from_a_file_offline(tmp_path, monkeypatch, capsys,
                                                         one_thread):
    """``backbone=<name> backbone.weights_path=<file>``, as the offline error advises: the file's
    weights (an empty TORCH_HOME, downloads fail), the ImageNet head included."""
    import torch
    from torchvision.models import resnet18

    from transferlab.tools.predict import imagenet_predictor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    torch.manual_seed(5)
    original = resnet18()
    torch.save(original.state_dict(), tmp_path / "mine.pth")
    body, head = imagenet_predictor("resnet18", None,
                                    fields={"weights_path": str(tmp_path / "mine.pth")}).model
    assert torch.equal(body.conv1.weight, original.conv1.weight)
    assert torch.equal(head[-1].weight, original.fc.weight)

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["backbone=resnet18", f"backbone.weights_path={tmp_path / 'mine.pth'}",
                 "top_k=2", str(tmp_path / "red.png")]) == 0
    assert len(top_k_by_image(capsys.readouterr().out)["red.png"]) == 2
    assert main(["backbone=resnet18", "backbone.weights_pth=x", str(tmp_path / "red.png")]) == 2
    assert "did you mean 'weights_path'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["a.jpg"], "give exactly one of backbone=<name>"),
    (["backbone=resnet18", "run=x", "a.jpg"], "backbone= and run= exclude each other"),
    (["run=x", "top_k=3", "a.jpg"], "top_k= goes with backbone=, not with run="),
    (["run=x", "backbone_source=timm", "a.jpg"], "backbone_source= goes with backbone="),
    (["backbone=resnet18", "checkpoint=last", "output=o.csv", "a.jpg"],
     "checkpoint= and output= go with run=, not with backbone="),
    (["backbone=resnet18"], "no PATH given"),
    (["run=x", "backbone.weights_path=w.pth", "a.jpg"],
     "backbone.weights_path= goes with backbone=, not with run="),
    (["backbone=resnet18", "top_k=0", "a.jpg"], "invalid value for top_k: '0'"),
    (["backbone=resnet18", "backbone_source=tim", "a.jpg"], "did you mean 'timm'"),
    (["--backbone", "resnet18", "a.jpg"], "--backbone is not an option: write backbone="),
    (["backbone=resnet18", "--top-k", "3", "a.jpg"], "--top-k is not an option: write top_k="),
    (["backbone=resnet18", "topk=3", "a.jpg"], "unknown key 'topk' (did you mean 'top_k'"),
])
def test_command_line_mistakes_are_one_line_before_any_model_is_built(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@pytest.mark.slow
def test_an_output_that_is_a_folder_is_one_line(tiny_run, tmp_path, capsys):
    save_digits(tmp_path / "photos", 2)
    (tmp_path / "out.csv").mkdir()
    assert main([f"run={tiny_run}", f"output={tmp_path / 'out.csv'}", str(tmp_path / "photos")]) \
        == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: Is a directory: {tmp_path / 'out.csv'}")

