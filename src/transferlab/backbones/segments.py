"""A backbone as a chain of segments, so that it can be cut at a block boundary.

``module(x)`` of a backbone is the chain ``segments[-1](... segments[0](x))`` when the backbone
has a sequential view: its ``nn.Sequential`` body (torchvision's CNNs, ``conv_encoder``) or the
known layout of timm's EfficientNet / MobileNet-style and ResNet models. Sequential children
are opened down to the level of the backbone's blocks, so that every block boundary is a
segment boundary. Backbones without a view (ViTs, other timm families) can only be used whole.

The view is checked once against ``module(x)`` on a random image; a view that does not give
the same output is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from transferlab.backbones.base import Backbone
from transferlab.errors import UserError
from transferlab.infra.imports import import_timm


@dataclass(frozen=True)
class Segment:
    """One step of the chain: ``path`` (relative to the backbone module) and what it runs.
    ``module`` is None for a parameter-free step that is not a module of its own (timm's
    ``forward_head`` after the features)."""

    path: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module | None

    def param_names(self) -> list[str]:
        if self.module is None:
            return []
        return [f"{self.path}.{n}" for n, _ in self.module.named_parameters()]


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _top_level(module: nn.Module) -> list[Segment] | None:
    """The backbone's forward as a list of its children (before opening them)."""
    if _is_plain_sequential(module):
        return [Segment(n, m, m) for n, m in module.named_children()]
    try:
        import_timm()
        from timm.models.efficientnet import EfficientNet
        from timm.models.resnet import ResNet
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(module) is EfficientNet and not getattr(module, "grad_checkpointing", False):
        names = ["conv_stem", "bn1", "blocks", "conv_head", "bn2"]
    elif type(module) is ResNet and not getattr(module, "grad_checkpointing", False):
        names = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    else:
        return None
    if float(getattr(module, "drop_rate", 0.0)) > 0:  # forward_head's dropout: random
        return None
    children = dict(module.named_children())
    if not all(n in children for n in names):
        return None
    return [Segment(n, children[n], children[n]) for n in names] + [
        Segment("forward_head", module.forward_head, None)]


def _open(segments: list[Segment], block_paths: list[str]) -> list[Segment]:
    """Open plain ``nn.Sequential`` segments that hold a block path strictly inside them."""
    out: list[Segment] = []
    for seg in segments:
        inside = any(p.startswith(seg.path + ".") for p in block_paths)
        if seg.module is not None and inside and _is_plain_sequential(seg.module):
            out += _open([Segment(f"{seg.path}.{n}", m, m)
                          for n, m in seg.module.named_children()], block_paths)
        else:
            out.append(seg)
    return out


def sequential_view(backbone: Backbone, image_size: int) -> list[Segment] | None:
    """The backbone's segments, checked against ``module(x)``, or None without a view."""
    top = _top_level(backbone.module)
    if top is None:
        return None
    segments = _open(top, [p for b in backbone.blocks for p in b.paths])
    module = backbone.module
    modes = {m: m.training for m in module.modules()}  # a stage's modes: put back as they were
    module.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator()
                            .manual_seed(0)).to(next(module.parameters()).device)
            expected, out = module(x), x
            for seg in segments:
                out = seg.fn(out)
    finally:
        for m, training in modes.items():
            m.training = training
    if out.shape != expected.shape or not torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
        return None
    return segments


def block_boundaries(segments: list[Segment], backbone: Backbone) -> list[int]:
    """The segment indices ``i`` where the chain can be cut (prefix ``segments[:i]``): every
    parameter before the cut belongs to a block that ends before it."""
    owner: list[set[int]] = []
    for seg in segments:
        blocks = set()
        for name in seg.param_names():
            for j, block in enumerate(backbone.blocks):
                if block.owns(name):
                    blocks.add(j)
        owner.append(blocks)
    cuts = []
    for i in range(1, len(segments) + 1):
        before = set().union(*owner[:i])
        after = set().union(*owner[i:]) if i < len(segments) else set()
        if not before & after:
            cuts.append(i)
    return cuts


def boundary_points(backbone: Backbone, segments: list[Segment]) -> list[tuple[int, int, str]]:
    """(segment index, block index, block name) of the last cut after each block of the
    backbone's sequential view ``segments``, input to output: the features "after block j"
    (those ``transferlab-rank`` scores and ``backbone.cut`` keeps)."""
    last: dict[int, int] = {}
    for cut in block_boundaries(segments, backbone):
        names = [n for s in segments[:cut] for n in s.param_names()]
        owners = [j for j, b in enumerate(backbone.blocks) for n in names if b.owns(n)]
        if owners:
            last[max(owners)] = cut
    return [(cut, j, backbone.blocks[j].name) for j, cut in sorted(last.items())]


class Chain(nn.Module):
    """The first segments of a backbone, each under its path in the whole backbone (so that
    parameter names, blocks and checkpoints read the same), run one after the other."""

    def __init__(self, segments: list[Segment]):
        super().__init__()
        for seg in segments:
            parent: nn.Module = self
            *outer, leaf = seg.path.split(".")
            for name in outer:
                if name not in parent._modules:
                    parent.add_module(name, nn.Module())
                parent = parent._modules[name]
            parent.add_module(leaf, seg.module)
        self.paths = [seg.path for seg in segments]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for path in self.paths:
            x = self.get_submodule(path)(x)
        return x


def cut_after(backbone: Backbone, block: str) -> Backbone:
    """``backbone`` up to and including ``block`` (its name or index; ``backbone.cut``): the
    blocks after it are dropped, and the features are that block's output (unpooled)."""
    names = [b.name for b in backbone.blocks]
    index = names.index(block) if block in names else (
        int(block) if block.lstrip("-").isdigit() else None)
    if index is None or not -len(names) <= index < len(names):
        raise UserError(f"backbone.cut={block}: {backbone.name} has no such block; name one of "
                        f"its {len(names)} blocks by index (0-{len(names) - 1}) or by name "
                        f"({names[0]} ... {names[-1]}; transferlab-blocks lists them)")
    index %= len(names)
    segments = sequential_view(backbone, backbone.input.size)
    points = {j: cut for cut, j, _ in boundary_points(backbone, segments)} if segments else {}
    if index not in points:
        why = ("it has no block-by-block view (backbone.cut takes torchvision CNNs, timm's "
               "EfficientNet / MobileNet / ResNet families and transferlab's conv_encoder)"
               if not segments else f"block {names[index]} does not end at a segment boundary")
        raise UserError(f"backbone.cut={block}: {backbone.name} cannot be cut there: {why}")
    if index == len(names) - 1:
        return backbone
    kept = [seg for seg in segments[:points[index]] if seg.module is not None]
    if len(kept) != points[index]:
        raise UserError(f"backbone.cut={block}: {backbone.name} cannot be cut there: a step "
                        "before the cut is not a module of its own")
    return replace(backbone, module=Chain(kept), blocks=backbone.blocks[:index + 1],
                   categories=None, imagenet_head=None, feature_shape=(), source=None)
