"""torchvision classification models as backbones (``torchvision.models.get_model``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from transferlab.backbones.base import Backbone, Block, InputSpec
from transferlab.backbones.weights import (
    load_torchvision_state_dict,
    load_weights_file,
    torchvision_weights_file,
)
from transferlab.config import BackboneConfig
from transferlab.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from torchvision import models as tvm


class TorchvisionViTFeatures(nn.Module):
    """The class-token features of a torchvision VisionTransformer (its ``heads`` removed)."""

    def __init__(self, vit: tvm.VisionTransformer):
        super().__init__()
        self.image_size = vit.image_size
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.encoder = vit.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision import models as tvm

        x = tvm.VisionTransformer._process_input(self, x)  # patchify; checks the size
        token = self.class_token.expand(x.shape[0], -1, -1)
        x = self.encoder(torch.cat([token, x], dim=1))
        return x[:, 0]


def _weights_enum(name: str, choice: str):
    from torchvision import models as tvm

    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no weights for model {name!r}") from None
    if choice in ("DEFAULT", "default", None):
        return enum.DEFAULT
    try:
        return enum[choice]
    except KeyError:
        names = [w.name for w in enum]
        raise UserError(
            f"unknown torchvision weights {choice!r} for {name}; choose one of "
            f"{', '.join(names)} or DEFAULT"
        ) from None


def _input_spec(weights) -> InputSpec:
    tf = weights.transforms()
    crop = int(tf.crop_size[0])
    resize = int(tf.resize_size[0])
    min_h, _ = weights.meta.get("min_size", (1, 1))
    return InputSpec(
        size=crop,
        mean=tuple(tf.mean),
        std=tuple(tf.std),
        interpolation=tf.interpolation.value,
        crop_pct=crop / resize,
        min_size=int(min_h),
        fixed_size=int(min_h) == crop,
    )


def _indexed_blocks(prefix: str, seq: nn.Sequential) -> list[Block]:
    return [Block(f"{prefix}.{i}", (f"{prefix}.{i}",)) for i in range(len(seq))
            if any(True for _ in seq[i].parameters())]


def _vgg_blocks(features: nn.Sequential) -> list[Block]:
    """One block per conv layer, named like Keras' VGG layers (block1_conv1, ...)."""
    blocks, stage, conv = [], 1, 0
    for i, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            conv += 1
            blocks.append(Block(f"block{stage}_conv{conv}", (f"features.{i}",)))
        elif isinstance(layer, nn.MaxPool2d):
            stage, conv = stage + 1, 0
    return blocks


def _split(name: str, model: nn.Module) -> tuple[nn.Module, list[Block], nn.Module]:
    """(feature module, blocks, ImageNet classifier) for a torchvision model."""
    from torchvision import models as tvm

    if isinstance(model, tvm.ResNet):
        body = nn.Sequential(OrderedDict(
            (n, getattr(model, n))
            for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ))
        blocks = [Block("stem", ("conv1", "bn1"))] + [
            Block(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)
        ]
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        return body, blocks, head
    if isinstance(model, tvm.VisionTransformer):
        body = TorchvisionViTFeatures(model)
        n = len(model.encoder.layers)
        blocks = (
            [Block("embed", ("conv_proj", "class_token", "encoder.pos_embedding"))]
            + [Block(f"layer{i}", (f"encoder.layers.encoder_layer_{i}",)) for i in range(n)]
            + [Block("norm", ("encoder.ln",))]
        )
        return body, blocks, model.heads
    if isinstance(model, tvm.VGG):
        body = nn.Sequential(OrderedDict(features=model.features))
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
        return body, _vgg_blocks(model.features), head
    if isinstance(model, tvm.ConvNeXt):
        # The final LayerNorm2d sits after pooling in torchvision's classifier: it stays there.
        body = nn.Sequential(OrderedDict(features=model.features))
        head = nn.Sequential(model.avgpool, model.classifier)
        return body, _indexed_blocks("features", model.features), head
    if hasattr(model, "features") and hasattr(model, "classifier"):
        # MobileNetV2/V3, EfficientNet, ...: features[i] are the blocks.
        body = nn.Sequential(OrderedDict(features=model.features))
        pool = getattr(model, "avgpool", nn.AdaptiveAvgPool2d(1))
        head = nn.Sequential(pool, nn.Flatten(1), model.classifier)
        return body, _indexed_blocks("features", model.features), head
    raise UserError(
        f"torchvision model {name!r} is not supported as a backbone yet: use one of the "
        "ResNet, VGG, MobileNet, EfficientNet, ConvNeXt or ViT families, or backbone=timm"
    )


def build_torchvision(cfg: BackboneConfig) -> Backbone:
    from torchvision import models as tvm

    available = tvm.list_models(module=tvm)
    if cfg.name not in available:
        raise UserError(
            f"unknown torchvision model {cfg.name!r}{did_you_mean(cfg.name, available)}"
        )
    weights = _weights_enum(cfg.name, cfg.weights)
    model = tvm.get_model(cfg.name, weights=None)
    source = "random initialisation"
    if cfg.pretrained and cfg.weights_path:  # a local file: no download, same metadata
        load_weights_file(model, cfg.weights_path, f"torchvision {cfg.name}")
        source = str(cfg.weights_path)
    elif cfg.pretrained:
        model.load_state_dict(load_torchvision_state_dict(weights, cfg.name))
        source = f"{torchvision_weights_file(weights)} ({weights})"
    body, blocks, head = _split(cfg.name, model)
    return Backbone(
        name=cfg.name,
        module=body,
        blocks=blocks,
        input=_input_spec(weights),
        pretrained=cfg.pretrained,
        categories=list(weights.meta["categories"]) if cfg.pretrained else None,
        imagenet_head=head if cfg.pretrained else None,
        weights=source,
    )
