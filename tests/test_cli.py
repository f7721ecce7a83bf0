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
