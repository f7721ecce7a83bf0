"""Partial restore: any subset of a checkpoint file's tensors, renamed onto a built backbone.

``backbone.init.*`` (:class:`~transferlab.config.InitConfig`) names the file and the mapping;
:func:`restore_into` copies the matching tensors into the backbone module in place (parameters
and buffers, e.g. BatchNorm running statistics) and returns a :class:`LoadReport`;
:func:`format_report` prints it as a table.

The file may be a transferlab checkpoint (its ``model`` state dict: ``backbone.*`` and
``head.*``), a plain state dict (torchvision / timm files), a PyTorch Lightning ``.ckpt``
(``state_dict``), a dict with ``model_state_dict``, or a ``.safetensors`` file. A transferlab
checkpoint that left out its pretrained tensors has them rebuilt and checked first
(:func:`transferlab.backbones.source.read_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.backbones.source import read_weights
from transferlab.config.schema import InitConfig
from transferlab.errors import UserError, did_you_mean


@dataclass
class Mismatch:
    """A file tensor whose backbone tensor has another shape (skipped)."""

    file_name: str
    name: str  # the backbone tensor
    file_shape: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass
class LoadReport:
    """What :func:`restore_into` did. ``loaded`` and ``unexpected`` are (file name, backbone
    name) pairs; every backbone tensor is in exactly one of loaded, missing or skipped."""

    path: str
    file_tensors: int  # tensors in the file
    selected: int  # after include / exclude / rename
    loaded: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone tensors left as built
    unexpected: list[tuple[str, str]] = field(default_factory=list)  # no such backbone tensor
    skipped: list[Mismatch] = field(default_factory=list)  # shape mismatches


def map_names(names: list[str], init: InitConfig) -> dict[str, str]:
    """File name -> backbone name of the selected file tensors.

    Order: ``include`` globs minus ``exclude`` globs, then ``strip_prefix`` (where a name
    starts with it), then ``add_prefix``; a ``rename`` entry maps its file name exactly, takes
    precedence over the prefixes and is selected whatever the globs say.
    """
    where = "backbone.init"
    for key in init.rename:
        if key not in names:
            raise UserError(f"{where}.rename: the file has no tensor {key!r}"
                            f"{did_you_mean(key, names)}")
    mapping: dict[str, str] = {}
    for name in names:
        if name in init.rename:
            mapping[name] = init.rename[name]
            continue
        if not any(fnmatchcase(name, g) for g in init.include):
            continue
        if any(fnmatchcase(name, g) for g in init.exclude):
            continue
        target = name
        if init.strip_prefix and target.startswith(init.strip_prefix):
            target = target[len(init.strip_prefix):]
        mapping[name] = init.add_prefix + target
    seen: dict[str, str] = {}
    for src, dst in mapping.items():
        if dst in seen:
            raise UserError(f"{where}: file tensors {seen[dst]!r} and {src!r} both map to "
                            f"{dst!r}: narrow backbone.init.include/exclude or use rename")
        seen[dst] = src
    return mapping


def _some(names: list[str], n: int = 4) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def restore_into(module: nn.Module, init: InitConfig) -> LoadReport:
    """Copy the tensors of ``init.path`` selected and renamed by ``init`` into ``module``.

    Shape mismatches are skipped (reported); with ``init.strict`` they, and backbone tensors
    left unloaded, are errors. Loading nothing is an error. Nothing is copied unless every
    check passes; tensors not loaded are untouched.
    """
    if not init.path:
        raise UserError("backbone.init.path is not set")
    tensors = read_weights(init.path, option="backbone.init.path")
    mapping = map_names(list(tensors), init)
    target = module.state_dict(keep_vars=True)  # the live parameters and buffers
    report = LoadReport(path=str(init.path), file_tensors=len(tensors), selected=len(mapping))
    for src, dst in mapping.items():
        if dst not in target:
            report.unexpected.append((src, dst))
        elif tuple(tensors[src].shape) != tuple(target[dst].shape):
            report.skipped.append(Mismatch(src, dst, tuple(tensors[src].shape),
                                           tuple(target[dst].shape)))
        else:
            report.loaded.append((src, dst))
    done = {dst for _, dst in report.loaded} | {m.name for m in report.skipped}
    report.missing = [n for n in target if n not in done]

    where = f"backbone.init.path {init.path}"
    if not report.loaded:
        if report.skipped:
            m = report.skipped[0]
            why = (f"all {len(report.skipped)} matching names differ in shape (e.g. {m.name}: "
                   f"file {m.file_shape}, backbone {m.shape})")
        elif not mapping:
            why = (f"backbone.init.include/exclude select none of its {len(tensors)} tensors "
                   f"(file names: {_some(list(tensors))})")
        else:
            why = "no file name matches a backbone tensor"
        raise UserError(
            f"{where}: nothing to load: {why}; file names after mapping: "
            f"{_some(list(mapping.values()))}; backbone names: {_some(list(target))}; "
            "set backbone.init.strip_prefix / add_prefix / include / rename")
    if init.strict and (report.skipped or report.missing):
        parts = []
        if report.skipped:
            m = report.skipped[0]
            parts.append(f"{len(report.skipped)} shape mismatches (e.g. {m.name}: file "
                         f"{m.file_shape}, backbone {m.shape})")
        if report.missing:
            parts.append(f"{len(report.missing)} backbone tensors not in the file "
                         f"({_some(report.missing)})")
        raise UserError(f"{where} (strict): {'; '.join(parts)}; set backbone.init.strict=false "
                        "to load the rest")
    with torch.no_grad():
        for src, dst in report.loaded:
            target[dst].copy_(tensors[src])
    return report


def _listing(title: str, rows: list[tuple[str, str]], limit: int) -> list[str]:
    lines = [f"{title} ({len(rows)})"]
    if not rows:
        return lines
    width = max(len(a) for a, _ in rows[:limit])
    lines += [f"  {a:<{width}}  {b}".rstrip() for a, b in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return lines


def format_report(report: LoadReport, limit: int = 10) -> str:
    """A readable table: a header with the file, the counts, then each list (capped)."""
    name = Path(report.path).name
    lines = [
        f"backbone.init from {name} ({report.path}): {report.selected} of "
        f"{report.file_tensors} file tensors selected",
        f"  loaded      {len(report.loaded):>6}",
        f"  missing     {len(report.missing):>6}  backbone tensors left as built",
        f"  unexpected  {len(report.unexpected):>6}  selected file tensors with no backbone "
        "tensor",
        f"  skipped     {len(report.skipped):>6}  shape mismatch",
        "",
    ]
    loaded = [(dst, "" if src == dst else f"<- {src}") for src, dst in report.loaded]
    lines += _listing("loaded: backbone tensor <- file tensor", loaded, limit)
    if report.skipped:
        rows = [(m.name, f"file {m.file_shape} vs backbone {m.shape}"
                 + ("" if m.file_name == m.name else f" (<- {m.file_name})"))
                for m in report.skipped]
        lines += _listing("skipped: shape mismatch", rows, limit)
    if report.missing:
        lines += _listing("missing: not in the file", [(n, "") for n in report.missing], limit)
    if report.unexpected:
        rows = [(dst, "" if src == dst else f"<- {src}") for src, dst in report.unexpected]
        lines += _listing("unexpected: no such backbone tensor", rows, limit)
    return "\n".join(lines)


def report_summary(report: LoadReport) -> dict[str, Any]:
    """The compact record of ``metrics.json`` (``init``)."""
    return {
        "path": report.path,
        "loaded": len(report.loaded),
        "missing": len(report.missing),
        "unexpected": len(report.unexpected),
        "skipped": len(report.skipped),
        "skipped_names": [m.name for m in report.skipped],
    }
