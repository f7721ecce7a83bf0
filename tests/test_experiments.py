"""Every ``conf/experiment`` preset composes and trains: one step per stage, on ``fake`` data."""

from __future__ import annotations

import json
import re

import pytest
import torch

from transferlab.backbones.conv_encoder import Autoencoder, ConvEncoder
from transferlab.config import load_config
from transferlab.run import train

from .conftest import CONF_DIR, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# A tiny data set: 12 training images (one batch: one step an epoch), 4 val images.
FAKE = ["dataset=fake", "dataset.size=16", "dataset.num_classes=2", "dataset.val_fraction=0.25",
        "trainer.batch_size=12", "trainer.num_workers=0", "trainer.progress=false",
        "backbone.pretrained=false"]  # no download: the architecture is what is tested
SLOW = {"vgg16_transfer", "vgg19_freeze_first_8", "vgg19_last_layer", "vgg19_scratch",
        "mobilenet_v2_two_stage"}


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory):
    """An autoencoder's weights, as ``experiment=ae_pretrain`` saves them."""
    path = tmp_path_factory.mktemp("ae") / "best.pt"
    model = Autoencoder(ConvEncoder([32, 64], latent_dim=64, image_size=32))
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in EXPERIMENTS])
def test_experiment_trains_one_step_a_stage(name, encoder_checkpoint, tmp_path, one_thread):
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    required = re.findall(r"\$\{transferlab_required:([\w.]+)", text)  # only init paths so far
    overrides = [f"experiment={name}", *FAKE, *(f"{k}={encoder_checkpoint}" for k in required)]
    run = load_config(compose_train(overrides), overrides)
    for stage in run.freeze.stages:  # one epoch a stage (the presets run many)
        stage.epochs = min(stage.epochs, 1)
    if run.task.name == "autoencoder":
        run.trainer.epochs = 1
    result = train(run, tmp_path, overrides)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    epochs = 1 if run.task.name == "autoencoder" else sum(s.epochs for s in run.freeze.stages)
    assert len(metrics["history"]) == epochs
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert result.built is not None and result.built.run is run
