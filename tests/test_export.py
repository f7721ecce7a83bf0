"""transferlab-export: ONNX and TorchScript files of a trained run that compute what the run's
PyTorch model computes, and a preprocessing.json that is enough to deploy them."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.cli.export import main
from transferlab.data.digits import digits_images
from transferlab.data.transforms import eval_transform
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.run import train
from transferlab.run.saved import restore_model, saved_run_config
from transferlab.tools.evaluate import eval_dataset

from .conftest import TINY, compose_train

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TOLERANCE = 1e-4


def pytorch_model(checkpoint):
    """The run's model as transferlab-eval rebuilds it, its config, backbone and image size."""
    ckpt = load_checkpoint(checkpoint)
    run = saved_run_config(ckpt["config"])
    model, backbone, size = restore_model(run, ckpt["model"], len(ckpt["classes"]))
    return model, run, backbone, size, [str(c) for c in ckpt["classes"]]


def onnx_probs(path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images.numpy()})[0]
    return torch.from_numpy(logits).softmax(-1).numpy()


def torchscript_probs(path, images: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():  # torch.jit.load is deprecated (still the way to load)
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        return module(images).softmax(-1).numpy()


def reference_probs(model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).softmax(-1).numpy()


def read_json(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_both_formats_compute_the_pytorch_probabilities(tiny_run, tmp_path, capsys, one_thread):
    out = tmp_path / "deploy"
    assert main([f"run={tiny_run}", f"output={out}", "samples=12"]) == 0
    stdout = capsys.readouterr().out
    assert "Verified:" in stdout and "on 12 digits val images" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.ts",
                                                      "preprocessing.json"]

    model, run, backbone, size, classes = pytorch_model(tiny_run / "checkpoints" / "best.pt")
    record = read_json(out / "preprocessing.json")
    spec = backbone.input
    assert record["classes"] == classes == [str(d) for d in range(10)]
    assert record["input"] == {"name": "image", "layout": "NCHW", "dtype": "float32",
                               "color": "RGB", "shape": ["batch", 3, 32, 32]}
    assert record["output"]["name"] == "logits" and record["output"]["shape"] == ["batch", 10]
    assert (record["image_size"], record["crop_size"]) == (32, [32, 32])
    crop_pct = spec.crop_pct if run.dataset.crop_pct is None else run.dataset.crop_pct
    assert record["resize_size"] == round(32 / crop_pct)
    assert record["mean"] == list(spec.mean) and record["std"] == list(spec.std)
    assert record["interpolation"] == spec.interpolation
    assert record["backbone"] == {"name": "test_efficientnet", "source": "timm"}
    assert record["run"]["name"] == run.name and record["run"]["dir"] == str(tiny_run)
    assert record["run"]["checkpoint"] == str(tiny_run / "checkpoints" / "best.pt")
    assert record["files"]["onnx"]["opset"] == 17
    assert record["files"]["onnx"]["exporter"] == "torchscript"
    assert record["files"]["onnx"]["failed"] == []
    assert record["files"]["torchscript"]["method"] == "torch.jit.trace"
    check = record["verification"]
    assert check["images"] == 12 and check["passed"] is True
    assert set(check["max_abs_diff"]) == {"onnx", "torchscript"}
    assert all(0 <= d <= TOLERANCE for d in check["max_abs_diff"].values())

    # On our own: real digit images of the val split, a batch size the export never saw.
    val = eval_dataset(run, backbone, size, "val", classes)
    images = torch.stack([val[i][0] for i in range(0, 35, 5)])  # 7 images
    expected = reference_probs(model, images)
    for probs in (onnx_probs(out / "model.onnx", images),
                  torchscript_probs(out / "model.ts", images)):
        assert probs.shape == (7, 10)
        np.testing.assert_allclose(probs, expected, rtol=0, atol=TOLERANCE)
    # The ONNX batch axis is symbolic, the rest fixed.
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 32, 32]


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_a_checkpoint_file_alone_and_one_format(tiny_run, capsys, one_thread):
    checkpoint = tiny_run / "checkpoints" / "last.pt"
    assert main([f"checkpoint={checkpoint}", "format=onnx", "verify=false", "opset=18"]) == 0
    out = tiny_run / "export"  # the run directory above checkpoints/
    assert "Not verified" in capsys.readouterr().out
    assert not (out / "model.ts").exists()
    record = read_json(out / "preprocessing.json")
    assert record["verification"] is None and list(record["files"]) == ["onnx"]
    assert record["files"]["onnx"]["opset"] == 18 and record["run"]["epoch"] == 2
    opsets = {o.domain: o.version for o in onnx.load(str(out / "model.onnx")).opset_import}
    assert opsets[""] == 18


@pytest.mark.slow  # it trains the module's tiny run (the fast tier stays under a minute)
def test_a_file_that_differs_from_pytorch_fails_verification(tiny_run, tmp_path, capsys,
                                                             monkeypatch, one_thread):
    """An exporter that gets the model slightly wrong (a shifted logit) is caught."""
    import transferlab.tools.export as export

    real = export.export_torchscript

    def off_by_a_little(model, path, image_size):
        class Shifted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                logits = self.model(x)
                return logits + torch.linspace(0, 0.05, logits.shape[1])

        return real(Shifted().eval(), path, image_size)

    monkeypatch.setattr(export, "export_torchscript", off_by_a_little)
    out = tmp_path / "bad"
    assert main([f"run={tiny_run}", f"output={out}", "samples=4"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: verification failed:") and "\n" not in err, err
    assert "TorchScript" in err and "Traceback" not in err
    check = read_json(out / "preprocessing.json")["verification"]
    assert check["passed"] is False
    assert check["max_abs_diff"]["onnx"] <= TOLERANCE < check["max_abs_diff"]["torchscript"]


@pytest.mark.slow  # torch.export is slow to start
def test_onnx_falls_back_to_the_torch_export_based_exporter(tiny_run, tmp_path, capsys,
                                                            monkeypatch, one_thread):
    """Where the deprecated TorchScript-based exporter fails (or is gone), the
    torch.export-based one writes one self-contained file that passes verification."""
    real = torch.onnx.export

    def without_legacy(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript-based ONNX exporter was removed")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", without_legacy)
    out = tmp_path / "out"
    assert main([f"run={tiny_run}", f"output={out}", "format=onnx", "samples=6"]) == 0
    assert "dynamo exporter" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "preprocessing.json"]
    record = read_json(out / "preprocessing.json")
    assert record["files"]["onnx"]["exporter"] == "dynamo"
    assert record["files"]["onnx"]["failed"] == [
        "torchscript exporter: the TorchScript-based ONNX exporter was removed"]
    assert record["verification"]["max_abs_diff"]["onnx"] <= TOLERANCE
    dims = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # the batch axis stays symbolic


@pytest.mark.slow  # it needs the session's tiny trained run (the fast tier stays under a minute)
def test_images_from_a_folder(tiny_run, tmp_path, capsys, one_thread):
    images, labels = digits_images()
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    assert main([f"run={tiny_run}", f"images={folder}", "samples=all", f"output={out}",
                 "format=torchscript"]) == 0
    assert f"on 6 images from {folder}" in capsys.readouterr().out
    check = read_json(out / "preprocessing.json")["verification"]
    assert check["images"] == 6 and check["max_abs_diff"]["torchscript"] <= TOLERANCE


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_missing_run_dir_is_one_line(tmp_path, capsys):
    assert main([f"run={tmp_path / 'nope'}"]) == 2
    assert f"run directory {tmp_path / 'nope'} does not exist" in one_line_error(capsys)


def test_a_run_without_checkpoints_is_one_line(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    assert main([f"run={tmp_path}"]) == 2
    assert "no checkpoint best.pt" in one_line_error(capsys)


@pytest.mark.slow
def test_a_logreg_run_has_no_network_to_export(tmp_path, capsys, one_thread):
    run_dir = tmp_path / "logreg"
    overrides = [*TINY, "task=logreg", "dataset.samples_per_class=5"]
    overrides.remove("trainer.epochs=1")  # task=logreg takes no epochs
    train(compose_train(overrides), run_dir)
    assert main([f"run={run_dir}"]) == 2
    assert f"{run_dir} is a task=logreg run" in one_line_error(capsys)
    assert not (run_dir / "export").exists()


@pytest.mark.slow
def test_an_autoencoder_run_has_no_classifier_to_export(tmp_path, capsys, one_thread):
    run_dir = tmp_path / "ae"
    train(compose_train(["experiment=ae_pretrain", "dataset.samples_per_class=2",
                         "trainer.epochs=1", "trainer.num_workers=0", "trainer.progress=false"]),
          run_dir)
    assert main([f"run={run_dir}"]) == 2
    assert "this is an autoencoder run" in one_line_error(capsys)
    assert not (run_dir / "export").exists()


def test_without_onnxruntime_it_says_how_to_install_before_any_work(tiny_run, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    out = tmp_path / "out"
    assert main([f"run={tiny_run}", f"output={out}"]) == 2
    err = one_line_error(capsys)
    assert "verifying model.onnx needs the onnxruntime package" in err
    assert "pip install 'transferlab[export]'" in err and not out.exists()


@pytest.mark.parametrize("argv, needle", [
    ([], "give run=<run dir>"),
    (["checkpoint=best"], "give run=<run dir>"),
    (["checkpoint=bset"], "did you mean 'best'"),
    (["run=x", "checkpoint=x/best.pt"], "give run= or a checkpoint file, not both"),
    (["checkpoint=nowhere/best.pt"], "checkpoint file nowhere/best.pt does not exist"),
    (["run=x", "format=tflite"], "invalid value for format: 'tflite'"),
    (["run=x", "samples=0"], "invalid value for samples: '0'"),
    (["run=x", "tolerance=0"], "expected a number > 0"),
    (["run=x", "verify=false", "images=photos"], "images= goes with verify=true"),
    (["--run", "x"], "--run is not an option: write run="),
])
def test_command_line_mistakes_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in one_line_error(capsys)


def test_help_lists_every_key(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("run=", "checkpoint=", "format=", "output=", "opset=", "verify=", "images=",
                "samples=", "tolerance="):
        assert key in out


# -- real photos -----------------------------------------------------------------------------
def deploy_without_transferlab(record: dict, path) -> np.ndarray:
    """preprocessing.json's steps with PIL and NumPy only: what a deployment would write."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    width, height = image.size
    short, (crop, _) = record["resize_size"], record["crop_size"]
    size = ((short, short * height // width) if width <= height
            else (short * width // height, short))
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    image = image.resize(size, filters[record["interpolation"]])
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    image = image.crop((left, top, left + crop, top + crop))
    x = np.asarray(image, dtype=np.float32) * np.float32(record["scale"])
    x = (x - np.array(record["mean"], np.float32)) / np.array(record["std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.slow  # trains on photos
@pytest.mark.data
def test_hymenoptera_val_photos_match_pytorch(hymenoptera, tmp_path, capsys, one_thread):
    run_dir = tmp_path / "run"
    train(compose_train([*TINY, "dataset=hymenoptera", f"dataset.root={hymenoptera}",
                         "dataset.samples_per_class=4", "dataset.image_size=64"]), run_dir)
    assert main([f"run={run_dir}", "samples=all"]) == 0
    photos = sorted(p for p in (hymenoptera / "val").rglob("*") if p.is_file())
    record = read_json(run_dir / "export" / "preprocessing.json")
    check = record["verification"]
    assert check["source"] == f"{len(photos)} hymenoptera val images", capsys.readouterr().out
    assert check["passed"] and all(d <= TOLERANCE for d in check["max_abs_diff"].values())
    assert record["classes"] == ["ants", "bees"] and record["image_size"] == 64

    # The photos again, prepared from preprocessing.json alone (PIL + NumPy): the inputs
    # transferlab's eval transform makes, to one level of 255 (PIL's resize vs torchvision's),
    # and into onnxruntime, the PyTorch model's probabilities.
    model, run, backbone, size, _ = pytorch_model(run_dir / "checkpoints" / "best.pt")
    transform = eval_transform(backbone.input, size, run.dataset.crop_pct)
    picked = photos[::8]
    ours = np.concatenate([deploy_without_transferlab(record, p) for p in picked])
    theirs = torch.stack([transform(Image.open(p).convert("RGB")) for p in picked])
    one_level = 1 / 255 / min(record["std"])
    assert np.abs(ours - theirs.numpy()).max() <= one_level * 1.001
    assert np.abs(ours - theirs.numpy()).mean() <= one_level * 0.01
    deployed = onnx_probs(run_dir / "export" / "model.onnx", torch.from_numpy(ours))
    np.testing.assert_allclose(deployed, reference_probs(model, theirs), rtol=0, atol=1e-2)


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_a_re_export_in_one_format_removes_the_other_formats_older_file(tiny_run, tmp_path,
                                                                          capsys, caplog,
                                                                          one_thread):
    """preprocessing.json describes the folder's model files: a model.ts of an earlier export
    does not stay beside a new format=onnx export."""
    out = tmp_path / "out"
    assert main([f"run={tiny_run}", f"output={out}", "format=torchscript", "verify=false"]) == 0
    assert (out / "model.ts").is_file()
    assert main([f"run={tiny_run}", f"output={out}", "format=onnx", "verify=false",
                 "opset=18"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "preprocessing.json"]
    assert list(read_json(out / "preprocessing.json")["files"]) == ["onnx"]
    assert "removed model.ts of an earlier export" in caplog.text


def test_an_output_that_cannot_be_written_is_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where the export folder should be")
    assert main([f"run={tiny_run}", f"output={tmp_path / 'taken'}", "verify=false"]) == 2
    assert f"error: File exists: {tmp_path / 'taken'}: check" in one_line_error(capsys)
