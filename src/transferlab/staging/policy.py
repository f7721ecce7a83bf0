"""Freeze policies: stages of selectors turned into parameter groups, requires_grad and BN modes.

A stage's ``train`` list names what trains (selectors) and at which learning rate. Everything a
stage does not select is frozen: ``requires_grad=False`` and absent from the optimizer.

Selectors:
- ``head`` / ``backbone``: the new head / the whole backbone;
- ``lora``: the LoRA adapters that ``freeze=lora`` adds to the backbone (:mod:`transferlab.lora`);
- ``blocks[i]``, ``blocks[a:b]`` (Python slice semantics, negatives count from the output end):
  blocks of the backbone, ordered input to output;
- a glob over full parameter names (``backbone.layer4.*``), or a module/parameter path
  (``backbone.layer4``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from transferlab.backbones import Backbone
from transferlab.config.schema import (
    FreezeConfig,
    SelectorSpec,
    StageSpec,
    SurgicalConfig,
)
from transferlab.errors import UserError, nearest
from transferlab.registry import FREEZE_POLICIES


@dataclass(frozen=True)
class Policy:
    """What a freeze policy knows beyond its schema and stages (its registry entry's builder):
    the key that gives its last stage more epochs when a finished or stopped run is resumed
    (``transferlab-train resume=<run> <key>=N``); None: its stages cannot be extended."""

    extends: str | None = "trainer.epochs"

    def extend(self, raw: dict, key: str, epochs: int) -> None:
        """Give the last stage of the saved config ``raw`` ``epochs`` epochs by ``key=epochs``
        (a one-line error when ``key`` is not this policy's)."""
        freeze = raw["freeze"]
        name, stages = freeze.get("name"), freeze["stages"]
        if self.extends is None:
            raise UserError(f"freeze={name}: its stages are planned from its settings, so a "
                            "resume cannot give its last stage more epochs; start a new run")
        if key != self.extends:
            raise UserError(f"{key} does not extend a freeze={name} run: its last stage "
                            f"({stages[-1]['name']}) takes {self.extends}=N")
        if self.extends == "trainer.epochs":
            if len(stages) != 1 or stages[0]["epochs"] != raw["trainer"]["epochs"]:
                raise UserError(f"trainer.epochs extends a run of one stage of trainer.epochs; "
                                f"freeze={name} has {len(stages)} stages of their own epochs: "
                                "start a new run")
            raw["trainer"]["epochs"] = epochs
        else:
            freeze[self.extends.removeprefix("freeze.")] = epochs
        stages[-1]["epochs"] = epochs


def policy_entry(name: str) -> Policy:
    """The registry entry of ``freeze=name``; a policy of your own (explicit stages, any
    name) is extended like a one-stage preset."""
    return FREEZE_POLICIES.builder(name) if name in FREEZE_POLICIES else Policy()


# The entries of the built-in policies (registered in transferlab.registry.load_builtins;
# conf/freeze/<name>.yaml holds their stages): one stage of trainer.epochs, a last stage of
# freeze.finetune_epochs (two_stage, lp_ft), stages planned from the policy's settings (gradual).
ONE_STAGE = Policy()
FINETUNE = Policy("freeze.finetune_epochs")
PLANNED = Policy(extends=None)

_BLOCKS = re.compile(r"^blocks\[\s*(-?\d*)\s*(:?)\s*(-?\d*)\s*\]$")
ADAPTER_PARTS = (".lora_A.", ".lora_B.")  # in the names of peft's LoRA adapter parameters


def is_adapter(name: str) -> bool:
    """Whether a parameter is a LoRA adapter's (``...qkv.lora_A.default.weight``)."""
    return any(part in name for part in ADAPTER_PARTS)


@dataclass
class ParamGroup:
    """Parameters that train together at one learning rate during a stage."""

    name: str
    param_names: list[str]
    lr: float


@dataclass
class StagePlan:
    index: int
    spec: StageSpec
    groups: list[ParamGroup]
    first_epoch: int  # 1-based epoch number the stage starts at

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.spec.epochs - 1

    def trainable(self) -> set[str]:
        return {n for g in self.groups for n in g.param_names}


def _block_param_names(backbone: Backbone, names: list[str], blocks) -> list[str]:
    return [n for n in names if n.startswith("backbone.")
            and any(b.owns(n[len("backbone."):]) for b in blocks)]


@dataclass(frozen=True)
class NamedSelector:
    """A selector that is a word: which parameter names it picks, and what to say when it
    picks none (None: the general hint)."""

    picks: Callable[[str], bool]
    when_empty: str | None = None


NAMED_SELECTORS = {
    "head": NamedSelector(lambda n: n.startswith("head.")),
    "backbone": NamedSelector(lambda n: n.startswith("backbone.")),
    "lora": NamedSelector(is_adapter, "the model has no LoRA adapters (freeze=lora adds them)"),
}


def resolve_selector(selector: str, names: list[str], backbone: Backbone) -> list[str]:
    """The parameter names (in model order) that ``selector`` picks out of ``names``."""
    sel = selector.strip()
    if sel in NAMED_SELECTORS:
        return [n for n in names if NAMED_SELECTORS[sel].picks(n)]
    match = _BLOCKS.match(sel)
    if match:
        start, colon, stop = match.groups()
        blocks = backbone.blocks
        try:
            if colon:
                chosen = blocks[slice(int(start) if start else None, int(stop) if stop else None)]
            else:
                chosen = [blocks[int(start)]]
        except (IndexError, ValueError):
            raise UserError(f"selector {sel!r}: the backbone has {len(blocks)} blocks "
                            f"(blocks[0] .. blocks[{len(blocks) - 1}])") from None
        return _block_param_names(backbone, names, chosen)
    if sel.startswith("blocks["):
        raise UserError(f"selector {sel!r} is not a block slice: write blocks[i] or blocks[a:b]")
    if any(c in sel for c in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, sel)]
    return [n for n in names if n == sel or n.startswith(sel + ".")]


def _no_match_error(sel: str, stage: StageSpec, names: list[str], backbone: Backbone) -> UserError:
    named = NAMED_SELECTORS.get(sel)
    if named is not None and named.when_empty:
        return UserError(f"selector {sel!r} in stage {stage.name!r} matches no parameter: "
                         f"{named.when_empty}")
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    candidates = ["head", "backbone"] + [f"backbone.{b.paths[0]}" for b in backbone.blocks] \
        + modules + names
    close = nearest(sel.rstrip(".*"), candidates)
    hint = f"; nearest names: {', '.join(close)}" if close else ""
    return UserError(
        f"selector {sel!r} in stage {stage.name!r} matches no parameter{hint}; blocks are "
        f"{', '.join(b.name for b in backbone.blocks)} (select them as blocks[i] or blocks[a:b])"
    )


def expand_stages(policy: FreezeConfig, backbone: Backbone) -> list[StageSpec]:
    """The policy's stages; a ``gradual`` policy becomes one stage per unfrozen block.

    Gradual: the head trains alone first; then every ``every`` epochs the next block down
    (output side first) joins, in its own parameter group, at
    ``block_lr_mult * decay**j`` times optimizer.lr for the j-th block unfrozen (j = 0, 1, ...).
    """
    if policy.gradual is None:
        return list(policy.stages)
    g = policy.gradual
    n = len(backbone.blocks)
    count = n if g.blocks is None else max(0, min(g.blocks, n))
    head_epochs = g.every if g.head_epochs is None else g.head_epochs
    stages = [StageSpec(name="head", epochs=head_epochs, train=[SelectorSpec("head")], bn=g.bn)]
    train = [SelectorSpec("head")]
    for j in range(count):
        index = n - 1 - j
        train = train + [SelectorSpec(f"blocks[{index}]", lr_mult=g.block_lr_mult * g.decay**j)]
        stages.append(StageSpec(name=f"+{backbone.blocks[index].name}", epochs=g.every,
                                train=train, bn=g.bn))
    return stages


def _split_by_block(group: ParamGroup, backbone: Backbone, decay: float) -> list[ParamGroup]:
    """Layer-wise LR decay: block i of n trains at lr * decay**(n-1-i); other params keep lr."""
    n = len(backbone.blocks)
    per_block: dict[int, list[str]] = {}
    rest = []
    for name in group.param_names:
        index = next((i for i, b in enumerate(backbone.blocks)
                      if name.startswith("backbone.") and b.owns(name[9:])), None)
        if index is None:
            rest.append(name)
        else:
            per_block.setdefault(index, []).append(name)
    out = [ParamGroup(group.name, rest, group.lr)] if rest else []
    for i in sorted(per_block):
        out.append(ParamGroup(backbone.blocks[i].name, per_block[i],
                              group.lr * decay ** (n - 1 - i)))
    return out


def plan_stages(model: nn.Module, backbone: Backbone, policy: FreezeConfig,
                base_lr: float) -> list[StagePlan]:
    """Resolve every stage's selectors into parameter groups with their learning rates."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(policy, SurgicalConfig):
        n = len(backbone.blocks)
        if not -n <= policy.block < n:
            raise UserError(f"freeze.block={policy.block} is out of range: the backbone has {n} "
                            f"blocks; give 0 .. {n - 1} (or -{n} .. -1 from the output end)")
    plans, epoch = [], 1
    for index, stage in enumerate(expand_stages(policy, backbone)):
        groups: list[ParamGroup] = []
        owner: dict[str, tuple[str, float]] = {}
        for entry in stage.train:
            sel: SelectorSpec = entry
            lr = sel.lr if sel.lr is not None else base_lr * sel.lr_mult
            picked = resolve_selector(sel.select, names, backbone)
            if not picked:
                raise _no_match_error(sel.select, stage, names, backbone)
            fresh = []
            for n in picked:
                if n in owner:
                    if owner[n][1] != lr:
                        raise UserError(
                            f"parameter {n} is selected by {owner[n][0]!r} "
                            f"(lr {owner[n][1]:g}) and by {sel.select!r} (lr {lr:g}) in stage "
                            f"{stage.name!r}: make the selectors disjoint or give them the "
                            "same learning rate"
                        )
                    continue
                owner[n] = (sel.select, lr)
                fresh.append(n)
            if fresh:
                group = ParamGroup(sel.select, fresh, lr)
                groups += ([group] if stage.layer_decay is None
                           else _split_by_block(group, backbone, stage.layer_decay))
        plans.append(StagePlan(index, stage, groups, epoch))
        epoch += stage.epochs
    return plans


def apply_stage(model: nn.Module, plan: StagePlan) -> None:
    """Set ``requires_grad`` so that exactly the stage's selected parameters train."""
    trainable = plan.trainable()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def frozen_batchnorms(model: nn.Module, trainable: set[str] | None = None) -> list[str]:
    """BatchNorm layers in frozen parts: their affine parameters are frozen or, for layers
    without affine parameters, those of the module that holds them are. Frozen: not
    requiring grad, or, given ``trainable`` (full parameter names), not among them."""
    modules = dict(model.named_modules())
    frozen = []
    for name, module in modules.items():
        if not is_batchnorm(module):
            continue
        owner = name
        params = list(module.named_parameters(recurse=False))
        if not params:  # affine=False: judge by the enclosing module
            owner = name.rpartition(".")[0]
            params = list(modules[owner].named_parameters())
        if trainable is None:
            trains = any(p.requires_grad for _, p in params)
        else:
            trains = any((f"{owner}.{n}" if owner else n) in trainable for n, _ in params)
        if params and not trains:
            frozen.append(name)
    return frozen


def eval_batchnorms(model: nn.Module, bn_mode: str,
                    trainable: set[str] | None = None) -> list[str]:
    """The BatchNorm layers a stage's ``bn`` mode keeps in eval mode (``trainable``: see
    :func:`frozen_batchnorms`)."""
    if bn_mode == "frozen":
        return frozen_batchnorms(model, trainable)
    if bn_mode == "eval":
        return [name for name, m in model.named_modules() if is_batchnorm(m)]
    return []


def training_batchnorms(model: nn.Module, plan: StagePlan) -> list[str]:
    """The BatchNorm layers that ``plan``'s stage trains (in train mode: they update their
    statistics), from the plan alone (the model's requires_grad is not read)."""
    kept = set(eval_batchnorms(model, plan.spec.bn, plan.trainable()))
    return [name for name, m in model.named_modules() if is_batchnorm(m) and name not in kept]


def set_train_mode(model: nn.Module, plan: StagePlan) -> None:
    """``model.train()``, then the BatchNorm layers the stage's ``bn`` mode names to eval mode.

    In eval mode a BatchNorm layer normalises with its stored statistics and does not update
    them, so a frozen backbone stays bit-identical, buffers included.
    """
    model.train()
    modules = dict(model.named_modules())
    for name in eval_batchnorms(model, plan.spec.bn):
        modules[name].eval()
