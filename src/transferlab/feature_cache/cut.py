"""Where a stage's model can be cut: the longest prefix of the backbone whose output is a pure
function of the image file for this stage.

A prefix qualifies when the training transform is deterministic (``augment=none``), none of
its parameters trains in the stage, every BatchNorm in it is in eval mode and no dropout /
stochastic depth in it is active. The cut sits at a block boundary. When the whole backbone
qualifies, the cut is the backbone's output, and the pooled vector when the head starts with
global average pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from transferlab.backbones import Backbone
from transferlab.backbones.segments import Segment, block_boundaries, sequential_view
from transferlab.heads import GlobalPool
from transferlab.staging.policy import is_batchnorm


@dataclass
class Cut:
    """A frozen, deterministic prefix: ``segments[:index]`` of the backbone's chain (``index``
    None: the whole backbone, run as one module), then global pooling when ``pooled``."""

    segments: list[Segment]  # the whole chain (empty when the backbone is cut whole)
    index: int | None
    pooled: bool
    last_block: str  # name of the last block in the prefix

    @property
    def whole(self) -> bool:
        return self.index is None

    @property
    def prefix(self) -> list[Segment]:
        return [] if self.index is None else self.segments[:self.index]

    @property
    def remainder(self) -> list[Segment]:
        return [] if self.index is None else self.segments[self.index:]

    def identity(self) -> dict:
        """What the cut is, for the cache key."""
        return {"whole": self.whole, "pooled": self.pooled,
                "segments": [s.path for s in self.prefix]}

    def describe(self) -> str:
        if self.whole:
            return "the whole backbone" + (" (pooled vector)" if self.pooled else "")
        return f"the backbone after block {self.last_block}"


_STOCHASTIC_NAMES = ("Dropout", "DropPath", "StochasticDepth", "DropBlock", "PatchDropout")


def _random_in_train_mode(module: nn.Module) -> bool:
    """Dropout-like layers (drop probability > 0) are random in train mode."""
    name = type(module).__name__
    if not any(s in name for s in _STOCHASTIC_NAMES):
        return False
    for attr in ("p", "drop_prob", "prob"):
        value = getattr(module, attr, None)
        if isinstance(value, int | float):
            return value > 0
    return True  # unknown probability: assume random


def _why_random(path: str, module: nn.Module) -> str | None:
    """Why the module (and what it holds) is not a pure function of its input, or None."""
    for name, sub in module.named_modules():
        where = f"{path}.{name}" if name else path
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            return f"{where} trains"
        if is_batchnorm(sub) and sub.training:
            return f"BatchNorm {where} is in train mode (bn: train)"
        if sub.training and _random_in_train_mode(sub):
            return f"{type(sub).__name__} {where} is active"
    return None


def find_cut(model: nn.Module, backbone: Backbone, image_size: int,
             view_cache: dict) -> tuple[Cut | None, str]:
    """The stage's cut (the model's ``requires_grad`` and modes already set for the stage), or
    None; and one line saying what was cut and why, or why not. ``view_cache`` keeps the
    backbone's sequential view between stages."""
    why = _why_random("backbone", backbone.module)
    if why is None:
        pooled = len(backbone.feature_shape) == 3 and _starts_with_pool(model)
        cut = Cut([], None, pooled, backbone.blocks[-1].name if backbone.blocks else "")
        return cut, f"cached {cut.describe()}: frozen, BatchNorm in eval mode, no dropout"
    if "view" not in view_cache:
        view_cache["view"] = sequential_view(backbone, image_size)
    segments = view_cache["view"]
    if segments is None:
        return None, (f"not cached: {why}, and the {backbone.name} backbone cannot be cut "
                      "inside (only a whole frozen backbone is cached for it)")
    first_why = None
    for index in sorted(block_boundaries(segments, backbone), reverse=True):
        if index == len(segments):
            continue  # the whole chain: checked above
        reasons = [_why_random(f"backbone.{s.path}", s.module) for s in segments[:index]
                   if s.module is not None]
        reasons = [r for r in reasons if r]
        if not reasons:
            if not any(s.param_names() for s in segments[:index]):
                break  # no frozen block before the cut: nothing to save
            last = _last_block(segments[:index], backbone)
            cut = Cut(segments, index, False, last)
            return cut, (f"cached {cut.describe()}: blocks up to {last} are frozen, their "
                         f"BatchNorm in eval mode, no dropout ({why} after it)")
        first_why = reasons[0]
    return None, f"not cached: {first_why or why} at the input end of the backbone"


def _last_block(prefix: list[Segment], backbone: Backbone) -> str:
    names = [n for s in prefix for n in s.param_names()]
    owners = [j for j, b in enumerate(backbone.blocks) for n in names if b.owns(n)]
    return backbone.blocks[max(owners)].name


def _starts_with_pool(model: nn.Module) -> bool:
    head = getattr(model, "head", None)
    first = next(iter(head.children()), None) if isinstance(head, nn.Sequential) else None
    return isinstance(first, GlobalPool)
