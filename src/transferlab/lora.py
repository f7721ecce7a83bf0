"""LoRA adapters on the backbone (``freeze=lora``; Hu et al. 2021, arXiv 2106.09685), made and
merged by Hugging Face ``peft``.

``freeze.target`` is a selector of the freeze grammar (:mod:`transferlab.staging.policy`:
``blocks[-4:]``, ``backbone``, a glob or a module path); every layer in the selection that
peft's LoRA adapts exactly gets an adapter (``freeze.layers``: ``linear``, ``conv`` or ``all``):

- ``nn.Linear``, a ViT's fused ``qkv`` included (one adapter for q, k and v together);
- ``nn.Conv2d`` with ``groups=1``, no dilation and zero padding (a 1x1 convolution is a Linear
  layer per pixel).

Other layers in the selection keep no adapter and are reported: grouped and depthwise
convolutions (peft cannot merge their adapters into the weights, so the model could not be
exported), dilated ones, and subclasses with a forward of their own (timm's ``Conv2dSame`` pads
at run time; an adapter built from the layer's attributes would not).

An adapted layer computes ``W x + (alpha / rank) * B(A(dropout(x)))``: ``A`` starts random,
``B`` at zero, so the adapted model starts as the pretrained one. ``W`` (and the bias) become
peft's ``base_layer`` (``...attn.qkv.base_layer.weight``); the adapters are
``...attn.qkv.lora_A.default.weight`` and ``...lora_B...`` (selector ``lora``).

Every command that builds a run's model (:func:`transferlab.run.build.build_classifier`: train,
resume, eval, predict, export) adds the same adapters, so checkpoints hold and load them.
:func:`merge_adapters` folds them into the weights (``W + (alpha / rank) B A``) for export.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from transferlab.backbones import Backbone
from transferlab.config.schema import LoraConfig
from transferlab.errors import UserError, nearest
from transferlab.staging.policy import is_adapter, resolve_selector

log = logging.getLogger("transferlab")

INSTALL_HINT = "pip install 'transferlab[lora]'"
ADAPTER_NAME = "default"  # peft's name of the one adapter each layer holds


def require_peft():
    """The ``peft`` package, or a one-line error saying how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError(f"freeze=lora needs the peft package: {INSTALL_HINT}") from None
    return peft


@dataclass
class Adapters:
    """The adapters a model holds: where, how large, and the selected layers left without."""

    target: str
    rank: int
    alpha: float
    dropout: float
    layers: dict[str, str]  # module path in the backbone -> its type (Linear, Conv2d)
    skipped: dict[str, str] = field(default_factory=dict)  # module path -> why it has none
    params: int = 0  # adapter parameters (lora_A + lora_B)

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in _count(self.layers.values()).items())
        line = (f"LoRA (peft): rank {self.rank}, alpha {self.alpha:g}, dropout "
                f"{self.dropout:g} on {len(self.layers)} layers of {self.target} ({kinds}): "
                f"{self.params:,} adapter params")
        if self.skipped:
            why = "; ".join(f"{n} {w}" for w, n in _count(self.skipped.values()).items())
            line += f"; left without: {why}"
        return line

    def record(self) -> dict:
        """For ``metrics.json`` (``lora``)."""
        return {"target": self.target, "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout, "params": self.params, "layers": list(self.layers),
                "skipped": dict(self.skipped)}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


KINDS = {"linear": ("Linear",), "conv": ("Conv2d",), "all": ("Linear", "Conv2d")}


def _kind(module: nn.Module) -> str | None:
    """``Linear`` / ``Conv2d`` / another layer with weights peft knows (``ConvNd``), or None for
    what is not such a layer (norms, containers)."""
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.modules.conv._ConvNd):
        return type(module).__name__
    return None


def why_not(module: nn.Module, layers: str) -> str | None:
    """Why LoRA leaves a Linear / convolution layer without an adapter, or None if it adapts
    it."""
    kind = _kind(module)
    if kind not in ("Linear", "Conv2d"):
        return f"{kind} layers (only Linear and Conv2d)"
    if kind not in KINDS[layers]:
        return f"{kind} layers (freeze.layers={layers})"
    base = nn.Linear if kind == "Linear" else nn.Conv2d
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} layers (a forward of their own)"
    if kind == "Conv2d":
        if module.groups > 1:
            return "grouped/depthwise convolutions (peft cannot merge them)"
        if any(d != 1 for d in module.dilation):
            return "dilated convolutions"
        if module.padding_mode != "zeros":
            return f"convolutions with padding_mode={module.padding_mode}"
    return None


def select_layers(model: nn.Module, backbone: Backbone,
                  cfg: LoraConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(layers that get an adapter, layers of the selection left without and why): module
    paths relative to the backbone, in model order. Mistakes are one-line errors."""
    names = [n for n, _ in model.named_parameters()]
    picked = resolve_selector(cfg.target, names, backbone)
    if not picked:
        candidates = ["backbone"] + [f"backbone.{b.paths[0]}" for b in backbone.blocks] + \
            sorted({n.rsplit(".", 1)[0] for n in names if n.startswith("backbone.")})
        close = nearest(cfg.target.rstrip(".*"), candidates)
        hint = f"; nearest names: {', '.join(close)}" if close else ""
        raise UserError(
            f"freeze.target={cfg.target!r} matches no parameter{hint}; blocks are "
            f"{', '.join(b.name for b in backbone.blocks)} (select them as blocks[i] or "
            "blocks[a:b])")
    outside = [n for n in picked if not n.startswith("backbone.")]
    if outside:
        raise UserError(f"freeze.target={cfg.target!r} selects {outside[0]}: LoRA adapts "
                        "backbone layers (the head trains in full); select backbone blocks or "
                        "modules, e.g. blocks[-4:]")
    modules = dict(backbone.module.named_modules())
    owners = dict.fromkeys(n[len("backbone."):].rpartition(".")[0] for n in picked)
    adapted, skipped = {}, {}
    for path in owners:
        module = modules[path]
        if _kind(module) is None:
            continue  # a norm, an embedding, a parameter of a container: not a layer to adapt
        why = why_not(module, cfg.layers)
        if why is None:
            adapted[path] = _kind(module)
        else:
            skipped[path] = why
    if not adapted:
        found = "; ".join(f"{n} {w}" for w, n in _count(skipped.values()).items()) or \
            "no Linear or convolution layer"
        raise UserError(f"freeze.target={cfg.target!r} selects no layer LoRA can adapt, only "
                        f"{found}: select other blocks (freeze.target=backbone: every layer)"
                        + (" or freeze.layers=all" if cfg.layers != "all" else ""))
    return adapted, skipped


def add_adapters(model: nn.Module, backbone: Backbone, cfg: LoraConfig) -> Adapters:
    """Put peft's LoRA adapters into ``backbone.module`` (the model's backbone) in place."""
    adapted, skipped = select_layers(model, backbone, cfg)  # selector mistakes before peft
    peft = require_peft()
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        # a pattern that peft matches against full module names (re.fullmatch): exactly these
        target_modules="|".join(re.escape(path) for path in adapted))
    peft.inject_adapter_in_model(config, backbone.module, adapter_name=ADAPTER_NAME)
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = {name for name, m in backbone.module.named_modules()
              if isinstance(m, BaseTunerLayer)}
    if tuners != set(adapted):  # peft's own matching disagrees: never train the wrong layers
        raise RuntimeError(f"peft adapted {sorted(tuners ^ set(adapted))[:3]} against the "
                           "selection")
    params = sum(p.numel() for n, p in backbone.module.named_parameters() if is_adapter(n))
    adapters = Adapters(cfg.target, cfg.rank, cfg.alpha, cfg.dropout, adapted, skipped, params)
    log.info("%s", adapters.describe())
    return adapters


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its layer's weights with peft (``merge(safe_merge=True)``:
    ``W + (alpha / rank) B A``, checked for NaNs) and put the plain layer back: the model then
    computes the same function without peft modules. Returns the number of layers merged."""
    require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    if getattr(model, "adapters", None) is not None:
        model.adapters = None
    return merged
