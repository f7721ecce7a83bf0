"""The experiment presets (Keras-style VGG, MobileNetV2 two-stage, autoencoder) and the
standard (Keras ImageDataGenerator) augmentation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from transferlab.backbones import build_backbone
from transferlab.config import load_config
from transferlab.data import build_splits
from transferlab.data.transforms import eval_transform, train_transform
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages

from .conftest import CONF_DIR, TINY
from .stage_helpers import (
    EXPERIMENTS,
    FAST,
    block_params,
    build_model,
    head_params,
    torch_lrs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 8. experiment presets -----------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.slow
def test_every_experiment_composes_and_loads(name, compose_cfg, tmp_path):
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    # values a preset requires from the command line (${transferlab_required:KEY,...})
    required = re.findall(r"\$\{transferlab_required:([\w.]+)", text)
    given = tmp_path / "given.pt"
    given.write_bytes(b"")
    run = load_config(compose_cfg([f"experiment={name}", *(f"{k}={given}" for k in required)]))
    # a preset names its runs, with the data they ran on (a preset runs on any dataset)
    assert run.name.startswith(name) and run.dataset.name in run.name, run.name
    assert run.freeze.stages or run.freeze.gradual


def _vgg19(freeze: str, **extra):
    return dict(backbone="vgg19", image_size=32, head="flatten_dense", optimizer="adam",
                epochs=5, freeze=freeze, **extra)


DOCUMENTED = {
    "mobilenet_v2_two_stage": dict(
        backbone="mobilenet_v2", image_size=160, head="linear", optimizer="rmsprop", lr=1e-4,
        freeze="two_stage", knobs=dict(head_epochs=10, finetune_epochs=10, fine_tune_at=12,
                                       finetune_lr_mult=0.1), stage_epochs=[10, 10]),
    "vgg19_last_layer": _vgg19("linear_probe", stage_epochs=[5], pretrained=True),
    "vgg19_freeze_first_8": _vgg19("freeze_first_n", knobs=dict(n=5), stage_epochs=[5],
                                   pretrained=True),
    "vgg19_scratch": _vgg19("scratch", stage_epochs=[5], pretrained=False),
    "vgg16_transfer": dict(backbone="vgg16", head="mlp", dropout=0.2, optimizer="adam",
                           freeze="linear_probe", augment="standard", image_size=224),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
@pytest.mark.slow
def test_experiment_documented_values(name, compose_cfg):
    want = DOCUMENTED[name]
    run = load_config(compose_cfg([f"experiment={name}"]))
    assert run.backbone.name == want["backbone"]
    assert run.dataset.image_size == want["image_size"]
    assert run.head.name == want["head"]
    assert run.optimizer.name == want["optimizer"]
    assert run.freeze.name == want["freeze"]
    if "lr" in want:
        assert run.optimizer.lr == pytest.approx(want["lr"])
    if "epochs" in want:
        assert run.trainer.epochs == want["epochs"]
    for key, value in want.get("knobs", {}).items():
        assert getattr(run.freeze, key) == pytest.approx(value), key
    if "stage_epochs" in want:
        assert [s.epochs for s in run.freeze.stages] == want["stage_epochs"]
    if "pretrained" in want:
        assert run.backbone.pretrained is want["pretrained"]
    if "dropout" in want:
        assert run.head.dropout == pytest.approx(want["dropout"])
    if "augment" in want:
        assert run.augment.name == want["augment"]
    if want["freeze"] == "scratch":
        assert [s.select for s in run.freeze.stages[0].train] == ["backbone", "head"]
        assert run.freeze.stages[0].bn == "train"


def keras_vgg_layers(features: nn.Sequential) -> list[str]:
    """Keras' VGG layer names for a torchvision VGG ``features`` (ReLU is part of Keras' conv)."""
    names, stage, conv = ["input_1"], 1, 0
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            conv += 1
            names.append(f"block{stage}_conv{conv}")
        elif isinstance(layer, nn.MaxPool2d):
            names.append(f"block{stage}_pool")
            stage, conv = stage + 1, 0
    return names


@pytest.mark.slow
def test_vgg19_freeze_first_8_freezes_keras_layers_before_8(compose_cfg):
    run = load_config(compose_cfg(["experiment=vgg19_freeze_first_8",
                                   "backbone.pretrained=false", *FAST]))
    model, backbone = build_model(run)
    assert backbone.feature_shape == (512, 1, 1)  # 32 px through five pools
    keras = keras_vgg_layers(backbone.module.features)
    assert len(keras) == 1 + 16 + 5  # input, 16 convs, 5 pools: Keras' VGG19 without its top
    with_weights = [name for name in keras[:8] if "_conv" in name]
    assert with_weights == ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
                            "block3_conv1"]
    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    apply_stage(model, plan)
    trainable = plan.trainable()
    frozen = [b.name for b in backbone.blocks if not block_params(backbone, [b]) & trainable]
    assert frozen == with_weights
    assert frozen == [b.name for b in backbone.blocks[:run.freeze.n]]
    for block in backbone.blocks:
        params = block_params(backbone, [block])
        assert params and (params <= trainable) == (block.name not in frozen), block.name
    assert head_params(model) <= trainable
    frozen_params = block_params(backbone, backbone.blocks[:5])
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen_params


def test_mobilenet_v2_fine_tune_at_12_unfreezes_features_12_to_18(compose_cfg):
    run = load_config(compose_cfg(["experiment=mobilenet_v2_two_stage",
                                   "backbone.pretrained=false", *FAST]))
    model, backbone = build_model(run)
    assert len(backbone.blocks) == 19
    head, tune = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert head.trainable() == head_params(model)
    unfrozen = [b.name for b in backbone.blocks if block_params(backbone, [b]) & tune.trainable()]
    assert unfrozen == [f"features.{i}" for i in range(12, 19)]
    assert unfrozen == [b.name for b in backbone.blocks[12:]]
    assert tune.trainable() == head_params(model) | block_params(backbone, backbone.blocks[12:])
    apply_stage(model, tune)
    lrs = torch_lrs(model, stage_optimizer(model, tune, run.optimizer, None))
    assert all(v == pytest.approx(1e-5) for v in lrs.values())
    assert (head.first_epoch, tune.first_epoch, tune.last_epoch) == (1, 11, 20)


# --- 9. the standard (Keras ImageDataGenerator) augmentation -------------------------------------


def test_standard_augment_composes_and_randomises(compose_cfg):
    run = load_config(compose_cfg([*TINY, "augment=standard"]))
    spec = yaml.safe_load((CONF_DIR / "augment" / "standard.yaml").read_text())
    for key, value in spec.items():
        if key == "defaults":
            continue
        assert getattr(run.augment, key) == pytest.approx(value) if key != "name" \
            else run.augment.name == value
    backbone = build_backbone(run.backbone)
    size = run.dataset.image_size
    augment = train_transform(backbone.input, size, run.augment, run.dataset.crop_pct)
    plain = eval_transform(backbone.input, size, run.dataset.crop_pct)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    pixels[:, :20] //= 4  # a structured image: flips and shifts change it
    image = Image.fromarray(pixels)

    torch.manual_seed(0)
    outs = [augment(image) for _ in range(6)]
    for out in outs:
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j]), (i, j)
    torch.manual_seed(0)
    assert torch.equal(augment(image), outs[0])  # seeded: runs are reproducible
    assert torch.equal(plain(image), plain(image))
    assert not torch.equal(plain(image), outs[0])

    splits = build_splits(run.dataset, run.augment, backbone.input, size)
    a, b = splits.train[0][0], splits.train[0][0]
    assert a.shape == (3, size, size) and not torch.equal(a, b)
    assert torch.equal(splits.val[0][0], splits.val[0][0])
