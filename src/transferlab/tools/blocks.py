"""A backbone's blocks, as freeze policies name them (``transferlab-blocks``): the ordered
parts, input to output, with their parameter counts and the selectors that pick them."""

from __future__ import annotations

import os

from transferlab.backbones import Backbone, build_backbone
from transferlab.tools.backbone_lookup import backbone_config


def block_rows(backbone: Backbone) -> list[tuple[int, int, str, int, str]]:
    """(index, negative index, name, parameters, module paths) per block, input to output."""
    params = dict(backbone.module.named_parameters())
    count = len(backbone.blocks)
    return [(i, i - count, block.name,
             sum(p.numel() for n, p in params.items() if block.owns(n)), _paths(block.paths))
            for i, block in enumerate(backbone.blocks)]


def _paths(paths: tuple[str, ...]) -> str:
    """``blocks.1.0.{conv_pw, bn1}`` for paths under one module, else the paths."""
    prefix = os.path.commonprefix(list(paths)).rpartition(".")[0]
    if len(paths) < 2 or not prefix:
        return ", ".join(paths)
    return f"{prefix}.{{{', '.join(p[len(prefix) + 1:] for p in paths)}}}"


def blocks_table(backbone: Backbone) -> str:
    """The blocks of ``backbone`` as a fixed-width table, with how to select them."""
    rows = block_rows(backbone)
    total = sum(p.numel() for p in backbone.module.parameters())
    name_w = max(len("block"), *(len(r[2]) for r in rows))
    lines = [f"backbone {backbone.name}: {len(rows)} blocks, {total:,} parameters, input "
             f"{backbone.input.size} px",
             f"{'index':>5} {'from end':>8}  {'block':<{name_w}} {'parameters':>12}  modules"]
    for index, negative, name, count, paths in rows:
        lines.append(f"{index:>5} {negative:>8}  {name:<{name_w}} {count:>12,}  {paths}")
    top2 = ", ".join(r[2] for r in rows[-2:])
    lines.append(f"Freeze policies select blocks by index: blocks[-2:] is the last two ({top2}), "
                 f"blocks[{rows[-1][0]}] the last, blocks[3:] all from index 3; e.g. "
                 "freeze=top_k freeze.k=2, or freeze=two_stage freeze.fine_tune_at=-2 "
                 "(docs/policies.md).")
    return "\n".join(lines)


def show_blocks(name: str, source: str | None = None, fields: dict | None = None) -> str:
    """The table of the backbone ``name`` (a preset, a torchvision or a timm model), built
    without its pretrained weights (the blocks are the architecture's) unless ``fields`` asks
    for them (``pretrained: true``)."""
    cfg = backbone_config(name, source, {"pretrained": False, **(fields or {})})
    return blocks_table(build_backbone(cfg))
