"""Autoencoder pretraining (task=autoencoder) and restoring its encoder into a classifier
(experiment=ae_transfer); the conv_encoder backbone."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from transferlab.backbones import build_backbone, probe_features
from transferlab.backbones.conv_encoder import ConvDecoder, ConvEncoder
from transferlab.cli.compare import main as compare_main
from transferlab.config import ConvEncoderConfig, compose_config, load_config
from transferlab.errors import UserError
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.infra.runtime import seed_everything
from transferlab.run import train
from transferlab.run.saved import saved_run_config

from .conftest import compose_train

pytestmark = pytest.mark.slow  # trains autoencoders

FAST = ["trainer.num_workers=0", "trainer.progress=false"]
AE = ["experiment=ae_pretrain", "dataset.samples_per_class=20", "trainer.epochs=4", *FAST]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """A tiny autoencoder run on 200 digits, 4 epochs (one thread: fastest for tiny nets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("ae")
        result = train(compose_train(AE), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir, result


def test_pretraining_lowers_reconstruction_loss_and_writes_artifacts(ae_run):
    run_dir, result = ae_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result.metrics["status"] == metrics["status"] == "completed"
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for record in history:
        assert record["stage"] == "autoencoder"
        assert {"train_loss", "val_loss", "seconds"} <= set(record)
        assert "val_acc" not in record and "train_acc" not in record
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    best = min(history, key=lambda r: r["val_loss"])
    assert metrics["best"] == {"epoch": best["epoch"], "val_loss": best["val_loss"]}
    assert metrics["final"]["epoch"] == 4
    assert metrics["data"]["train"] == 200
    assert result.best_val_acc == 0.0  # no accuracy: what a sweep's objective gets

    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]
    assert list(state)[:6] == ["encoder.conv1.weight", "encoder.conv1.bias",
                               "encoder.conv2.weight", "encoder.conv2.bias",
                               "encoder.fc.weight", "encoder.fc.bias"]
    assert all(k.startswith(("encoder.", "decoder.")) for k in state)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 4
    assert (run_dir / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/recon_loss", "val/recon_loss"} <= set(events.Tags()["scalars"])
    assert "train/acc" not in events.Tags()["scalars"]
    images = events.Images("recon/val")
    assert [i.step for i in images] == [1, 2, 3, 4]
    # 8 val images above their 8 reconstructions: 2 rows of 32 px (+ 2 px padding)
    assert (images[-1].width, images[-1].height) == (8 * 34 + 2, 2 * 34 + 2)


def test_compare_reads_an_autoencoder_run(ae_run, tmp_path, capsys):
    run_dir, _ = ae_run
    assert compare_main([str(run_dir), "format=markdown", f"plot={tmp_path / 'val.png'}"]) == 0
    out = capsys.readouterr().out
    row = out.strip().splitlines()[-1]
    assert "completed" in row and "| - |" in row  # no accuracy: a dash
    assert (tmp_path / "val.png").is_file()


def test_ae_transfer_restores_the_conv_layers_frozen_and_trains_the_fc_layers(
        ae_run, tmp_path, one_thread):
    ae_dir, _ = ae_run
    ae_state = load_checkpoint(ae_dir / "checkpoints" / "best.pt")["model"]
    cfg = compose_train(["experiment=ae_transfer",
                         f"backbone.init.path={ae_dir / 'checkpoints' / 'best.pt'}",
                         "dataset.samples_per_class=10", "trainer.epochs=2", *FAST])
    run = load_config(cfg)
    assert run.freeze.name == "top_k" and run.backbone.init.strip_prefix == "encoder."
    metrics = train(cfg, tmp_path).metrics
    assert metrics["status"] == "completed"
    assert metrics["init"]["loaded"] == 4  # conv1/conv2 weight and bias, not encoder.fc
    assert metrics["params"]["trainable"] == 64 * 64 * 8 * 8 + 64 + 64 * 10 + 10  # fc + head

    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        assert torch.equal(state[f"backbone.{name}"], ae_state[f"encoder.{name}"]), name
    # fc and head start from random weights (the run's seed) and train
    seed_everything(run.seed, False)
    fresh = build_backbone(run.backbone).module.state_dict()
    assert not torch.equal(fresh["conv1.weight"], ae_state["encoder.conv1.weight"])
    assert not torch.equal(state["backbone.fc.weight"], fresh["fc.weight"])
    assert not torch.equal(state["backbone.fc.weight"], ae_state["encoder.fc.weight"])


def test_ae_transfer_needs_the_checkpoint_path():
    message = (r"backbone\.init\.path is not set: add backbone\.init\.path=\.\.\. "
               r"\(checkpoints/best\.pt of the autoencoder run\) to the command line")
    with pytest.raises(UserError, match=message):
        load_config(compose_train(["experiment=ae_transfer"]))


def test_scratch_baseline_composes():
    run = load_config(compose_train(["experiment=ae_scratch"]))
    transfer = load_config(compose_train(["experiment=ae_transfer", "backbone.init.path=null"]))
    assert run.backbone.init.path is None and run.freeze.name == "scratch"
    assert [s.train[0].select for s in run.freeze.stages] == ["backbone"]
    assert run.backbone.channels == transfer.backbone.channels
    assert run.dataset == transfer.dataset
    assert run.trainer == transfer.trainer and run.head == transfer.head


def test_a_policy_knob_of_another_policy_is_refused():
    with pytest.raises(UserError, match=r"experiment/ae_transfer.*freeze\.k.*freeze=top_k"):
        compose_config(["experiment=ae_transfer", "freeze=scratch"])


def test_an_autoencoder_checkpoint_is_no_classifier(ae_run):
    ae_dir, _ = ae_run
    config = load_checkpoint(ae_dir / "checkpoints" / "best.pt")["config"]
    with pytest.raises(UserError, match="autoencoder run"):
        saved_run_config(config)


def test_conv_encoder_backbone():
    backbone = build_backbone(ConvEncoderConfig())
    assert [b.name for b in backbone.blocks] == ["conv1", "conv2", "fc"]
    assert probe_features(backbone, 32) == (64,)
    assert backbone.input.size == 32 and backbone.input.fixed_size
    with pytest.raises(UserError, match="accepts only 32x32"):
        probe_features(backbone, 64)


@pytest.mark.parametrize("size", [28, 31, 32])
def test_decoder_mirrors_the_encoder(size):
    encoder = ConvEncoder([8, 16, 16], latent_dim=12, image_size=size)
    decoder = ConvDecoder(encoder)
    x = torch.zeros(2, 3, size, size)
    assert encoder(x).shape == (2, 12)
    assert decoder(encoder(x)).shape == x.shape
    assert [n for n, _ in decoder.named_children() if n.startswith("deconv")] == \
        ["deconv3", "deconv2", "deconv1"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["backbone=conv_encoder", "backbone.pretrained=true"],
     "conv_encoder has no pretrained weights: restore your own with backbone.init.path"),
])
def test_conv_encoder_errors(overrides, message):
    run = load_config(compose_train(overrides))
    with pytest.raises(UserError, match=message):
        build_backbone(run.backbone)


def test_conv_encoder_fields_belong_to_it():
    with pytest.raises(UserError, match=r"unknown key backbone\.latent_dim: backbone=torchvision "
                                        r"has no such key \(it belongs to backbone=transferlab\)"):
        load_config(compose_train(["backbone=resnet18", "+backbone.latent_dim=8"]))


def test_task_errors(tmp_path):
    with pytest.raises(UserError,
                       match="unknown task.name 'autoencodr'.*classify, logreg, autoencoder"):
        load_config(compose_train(["task.name=autoencodr"]))
    cfg = compose_train(["task=autoencoder", *FAST])  # the default backbone: not an encoder
    with pytest.raises(UserError, match="add backbone=conv_encoder"):
        train(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
