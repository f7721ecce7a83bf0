"""The installed command: a real run, and one clear line (no traceback) for each user mistake."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import SHORT, TINY, cli

pytestmark = pytest.mark.slow  # a process each (imports torch)

def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_run_writes_a_run_directory_and_says_where(tmp_path):
    proc = cli(TINY, tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1 and runs[0].name.endswith("digits-test_efficientnet-linear_probe")
    assert json.loads((runs[0] / "metrics.json").read_text())["status"] == "completed"
    assert (runs[0] / ".hydra" / "config.yaml").is_file()
    # as the user would type it: relative to the working directory (the README's lines)
    relative = runs[0].relative_to(tmp_path)
    assert str(relative).startswith("outputs/runs/")
    assert proc.stdout.splitlines()[-2:] == [f"Run saved to: {relative}",
                                              f"Open it in TensorBoard: tensorboard --logdir "
                                              f"{relative}"]


def test_missing_dataset_root(tmp_path):
    proc = cli([*TINY, "dataset=image_folder", f"dataset.root={tmp_path}/nope"], tmp_path)
    assert_one_line_error(proc, "does not exist", "dataset.root")


def test_root_without_class_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli([*TINY, "dataset=image_folder", f"dataset.root={tmp_path}/empty"], tmp_path)
    assert_one_line_error(proc, "no class folders")


def test_unknown_group_option_lists_the_choices(tmp_path):
    proc = cli(["backbone=resnet1"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "resnet18" in proc.stderr and "efficientnet_lite0" in proc.stderr


def test_weights_unavailable_offline(tmp_path):
    # An empty TORCH_HOME and a proxy that refuses connections: the download must fail.
    proc = cli([*SHORT, "backbone=resnet18", "backbone.pretrained=true"], tmp_path,
               TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")
    assert_one_line_error(proc, "resnet18-f37072fd.pth", str(tmp_path / "torch"),
                          "backbone.pretrained=false")


def test_image_too_small_for_the_architecture(tmp_path):
    proc = cli(["backbone=vgg16", "backbone.pretrained=false", *SHORT, "dataset.image_size=16"],
               tmp_path)
    assert_one_line_error(proc, "vgg16", "dataset.image_size")


def test_image_below_the_default_backbones_stride(tmp_path):
    proc = cli(["dataset.image_size=8", *SHORT[1:]], tmp_path)
    assert_one_line_error(proc, "image size 8x8", "efficientnet_lite0 (32x32, its total stride)",
                          "dataset.image_size to at least 32")


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    proc = cli([*TINY, "hydra.run.dir=/proc/transferlab/run"], tmp_path)
    assert_one_line_error(proc, "/proc/transferlab", "hydra.run.dir")


def _csv_data(tmp_path, rows: list[str]) -> list[str]:
    """A folder of 8 small images (two looks: one per class) plus float TIFFs, and a CSV of
    ``rows`` naming them; the overrides that train on it."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(8):
        pixels = np.full((32, 32, 3), 40 if i % 2 else 200, dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        level = np.full((32, 32), 0.15 if i % 2 else 0.8, dtype=np.float32)  # in [0, 1]
        Image.fromarray(level, mode="F").save(images / f"{i}.tif")
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{r}\n" for r in rows))
    return [*TINY, "dataset=csv", f"dataset.root={images}",
            f"dataset.csv_file={tmp_path / 'labels.csv'}", "dataset.val_fraction=0.5",
            "augment=none"]


@pytest.mark.parametrize(("rows", "needle"), [
    ([f"{i}.png,{i % 2}" for i in range(8)] + ["../labels.csv,0"],
     "labels.csv row 10: '../labels.csv' is outside dataset.root="),
    ([f"{i}.png,{i % 2}" for i in range(8)] + ["0.png,1"],
     "labels.csv rows 2 and 10 give '0.png' two labels ('0', '1'): keep one row per file"),
    ([f"{i}.png,{'ants' if i < 4 else 'bees'}" for i in range(7)] + ["7.png,wasps"],
     "class 'wasps' has 1 image, every class needs at least 2"),  # once named [2]
])
def test_a_csv_that_steers_outside_its_root_or_labels_a_file_twice_is_one_line(rows, needle,
                                                                              tmp_path):
    proc = cli(_csv_data(tmp_path, rows), tmp_path)
    assert_one_line_error(proc, needle)


def test_float_tiffs_and_labels_beyond_float_precision_train_as_they_are(tmp_path):
    """Two classes whose labels differ in their 20th digit stay two classes, and float TIFFs
    in [0, 1] are the images they are (once all black: a run at chance)."""
    big = ("12345678901234567890", "12345678901234567891")
    proc = cli([*_csv_data(tmp_path, [f"{i}.tif,{big[i % 2]}" for i in range(8)]),
                "trainer.epochs=8", "optimizer.lr=0.05"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    metrics = json.loads((run / "metrics.json").read_text())
    assert " 2 classes, " in proc.stdout  # the run's first line: not merged into one
    assert metrics["best"]["val_acc"] == 1.0  # the two looks told apart: the pixels are there
