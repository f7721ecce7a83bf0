"""A small convolutional encoder (source ``transferlab``, name ``conv_encoder``) and the decoder
that mirrors it.

The same encoder is the autoencoder's (``task=autoencoder``) and a classifier's backbone, so a
classifier restores the pretrained one by name (``backbone.init`` with
``strip_prefix: "encoder."``). Parameter names::

    conv1.weight, conv1.bias, conv2.weight, ..., fc.weight, fc.bias

Its fc layer takes one input size only (``backbone.image_size``); its features are the latent
vector ``(latent_dim,)`` after a ReLU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from transferlab.backbones.base import Backbone, Block, InputSpec, check_blocks_cover
from transferlab.config.schema import ConvEncoderConfig
from transferlab.errors import UserError

NAME = "conv_encoder"
MEAN = STD = (0.5, 0.5, 0.5)  # images in [-1, 1]


def conv_out(size: int) -> int:
    """Side of a Conv2d(kernel 3, stride 2, padding 1) output: ceil(size / 2)."""
    return (size - 1) // 2 + 1


class ConvEncoder(nn.Sequential):
    """``conv1, relu1, conv2, relu2, ..., flatten, fc, relu_fc``: stride-2 3x3 convolutions, then
    a fully connected latent. ``sizes[i]`` is the side of the map before conv ``i + 1`` (the
    last entry: after the last conv)."""

    def __init__(self, channels: list[int], latent_dim: int, image_size: int):
        sizes = [image_size]
        for _ in channels:
            sizes.append(conv_out(sizes[-1]))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = 3
        for i, out_ch in enumerate(channels, start=1):
            layers[f"conv{i}"] = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            in_ch = out_ch
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(in_ch * sizes[-1] ** 2, latent_dim)
        layers["relu_fc"] = nn.ReLU(inplace=True)
        super().__init__(layers)
        self.channels, self.latent_dim, self.sizes = list(channels), latent_dim, sizes


class ConvDecoder(nn.Sequential):
    """The encoder mirrored: ``fc`` (latent -> C x h x w), ReLU, then one stride-2 transposed
    convolution per encoder conv (``deconvN`` undoes ``convN``) back to 3 channels at the input
    size. The output is linear: images in the normalised pixel space the loader gives."""

    def __init__(self, encoder: ConvEncoder):
        channels, sizes = encoder.channels, encoder.sizes
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["fc"] = nn.Linear(encoder.latent_dim, channels[-1] * sizes[-1] ** 2)
        layers["relu_fc"] = nn.ReLU(inplace=True)
        layers["unflatten"] = nn.Unflatten(1, (channels[-1], sizes[-1], sizes[-1]))
        outs = [3, *channels[:-1]]  # the channels each deconv gives back
        for i in range(len(channels), 0, -1):
            # (s_in - 1) * 2 - 2 + 3 + extra = target side: extra is 0 or 1
            extra = sizes[i - 1] - (2 * sizes[i] - 1)
            layers[f"deconv{i}"] = nn.ConvTranspose2d(channels[i - 1], outs[i - 1], kernel_size=3,
                                                      stride=2, padding=1, output_padding=extra)
            if i > 1:
                layers[f"relu{i}"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class Autoencoder(nn.Module):
    """``decoder(encoder(x))``; parameter names start with ``encoder.`` or ``decoder.``, so
    ``backbone.init.strip_prefix: "encoder."`` restores the encoder of its checkpoint."""

    def __init__(self, encoder: ConvEncoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = ConvDecoder(encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def encoder_shape(cfg: ConvEncoderConfig) -> tuple[list[int], int, int]:
    """(channels, latent_dim, image_size) of ``cfg`` (checked by the config's validation)."""
    return list(cfg.channels), cfg.latent_dim, cfg.image_size


def build_conv_encoder(cfg: ConvEncoderConfig) -> Backbone:
    """The ``transferlab`` source: ``conv_encoder``, randomly initialised (restore trained
    weights with ``backbone.init``)."""
    if cfg.name != NAME:
        raise UserError(f"unknown transferlab backbone {cfg.name!r}; the transferlab source has "
                        f"one: {NAME}")
    if cfg.pretrained:
        raise UserError(f"{NAME} has no pretrained weights: restore your own with "
                        "backbone.init.path (and set backbone.pretrained=false)")
    channels, latent, size = encoder_shape(cfg)
    module = ConvEncoder(channels, latent, size)
    blocks = [Block(f"conv{i}", (f"conv{i}",)) for i in range(1, len(channels) + 1)]
    backbone = Backbone(
        name=NAME,
        module=module,
        blocks=[*blocks, Block("fc", ("fc",))],
        input=InputSpec(size=size, mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0,
                        min_size=size, fixed_size=True),
        pretrained=False,
        feature_shape=(latent,),
    )
    check_blocks_cover(backbone)
    return backbone
