"""``transferlab-soup``: average the weights of a sweep's runs (model soups, Wortsman et al.
2022) into a new run directory that ``transferlab-eval``, ``-predict`` and ``-export`` read.

* ``uniform``: the mean of every member's weights.
* ``greedy``: the members sorted by their accuracy on a held-out split, best first; each is
  added only when the soup's held-out measure improves (accuracy, ties broken by a lower loss).

Members are the runs under the sweep directory with ``checkpoints/<checkpoint>.pt``; a run
whose backbone or head config, classes, or state-dict keys and shapes differ from the first
run's is left out, with one line saying why. Every floating-point tensor is averaged, the
BatchNorm running statistics included; integer tensors (``num_batches_tracked``) are taken
from the first member.

The held-out measure is never the val split: val is what the soup's accuracy is reported on,
and choosing members by it would make that report optimistic. ``held_out=test`` measures on
the data's test split (``dataset.test_fraction`` carves one out of the images the runs never
trained on, as the paper holds out part of the training set); the soup's test accuracy is then
no longer an unbiased estimate, its val accuracy is.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from transferlab.choices import SOUP_JSON
from transferlab.errors import UserError
from transferlab.infra.checkpoint import FORMAT, load_checkpoint, write_sealed
from transferlab.infra.runtime import Precision, pick_device
from transferlab.run.predictions import Predictions, predict, predictions_file, save_predictions
from transferlab.run.saved import checkpoint_config, restore_model, restore_saved

log = logging.getLogger("transferlab")


@dataclass
class SoupArgs:
    """The parsed command line."""

    sweep: Path
    method: str = "uniform"
    held_out: str | None = None  # greedy: the split members are chosen by
    output: Path | None = None  # default: <sweep>/soup_<method>
    checkpoint: str = "best"
    device: str | None = None  # None: the first member's trainer.device

    @property
    def out_dir(self) -> Path:
        return self.output or self.sweep / f"soup_{self.method}"


@dataclass(frozen=True)
class Measure:
    """Accuracy and loss on a split."""

    accuracy: float
    loss: float

    def beats(self, other: Measure | None) -> bool:
        """Higher accuracy, or the same accuracy at a lower loss."""
        return other is None or (self.accuracy, -self.loss) > (other.accuracy, -other.loss)

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "loss": self.loss}


@dataclass
class Member:
    """One run of the sweep: its weights (every tensor, on the CPU) and where they came from."""

    run_dir: Path
    path: Path
    config: dict
    classes: list[str]
    state: dict[str, torch.Tensor]
    val_acc: float | None
    splits: dict[str, str]  # each split's identity when the run trained (its data fingerprint)
    measure: Measure | None = None


@dataclass
class Soup:
    """The result: its weights, its members and the record of how they were chosen."""

    state: dict[str, torch.Tensor]
    members: list[Member]
    record: dict[str, Any] = field(default_factory=dict)


# -- members ---------------------------------------------------------------------------------
def member_dirs(sweep: Path, checkpoint: str, output: Path) -> tuple[list[Path], list[dict]]:
    """The runs under ``sweep`` (directories with ``metrics.json`` or the checkpoint), in name
    order, not the output nor an earlier soup (a directory with soup.json): those with
    ``checkpoints/<checkpoint>.pt``, and one line for each without."""
    if not sweep.is_dir():
        raise UserError(f"sweep directory {sweep} does not exist")
    out = output.resolve()
    found = {p.parent.parent for p in sweep.rglob(f"checkpoints/{checkpoint}.pt")}
    found |= {p.parent for p in sweep.rglob("metrics.json")}
    runs = [d for d in sorted(found) if d.resolve() != out and out not in d.resolve().parents
            and not (d / SOUP_JSON).is_file()]
    have = [d for d in runs if (d / "checkpoints" / f"{checkpoint}.pt").is_file()]
    if not have:
        raise UserError(f"no run under {sweep} has checkpoints/{checkpoint}.pt: give the "
                        "directory of a finished transferlab-train -m sweep")
    left_out = [{"run": str(d), "why": f"no checkpoints/{checkpoint}.pt (a task=logreg run, "
                 "or one that saved none)"} for d in runs if d not in have]
    return have, left_out


def load_member(run_dir: Path, checkpoint: str) -> Member:
    """A run's weights, every tensor present (those a checkpoint left out as equal to the
    pretrained ones are rebuilt and checked, as ``transferlab-eval`` does)."""
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    ckpt = load_checkpoint(path)
    classes = [str(c) for c in ckpt.get("classes") or []]
    if "model" not in ckpt or not classes:
        raise UserError(f"{path} holds no model weights or class names")
    model, _, _ = restore_saved(checkpoint_config(ckpt), ckpt, path, "raw", len(classes))
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    identity = ((ckpt.get("loop") or {}).get("data") or {}).get("identity") or {}
    return Member(run_dir, path, ckpt["config"], classes, state,
                  (ckpt.get("best") or {}).get("val_acc"), identity)


def mismatch(member: Member, first: Member) -> str | None:
    """Why ``member`` cannot be averaged with ``first`` (None: it can)."""
    for part in ("backbone", "head"):
        mine, theirs = member.config.get(part) or {}, first.config.get(part) or {}
        if mine != theirs:
            keys = sorted(set(mine) | set(theirs), key=lambda k: (k != "name", k))
            key = next(k for k in keys if mine.get(k) != theirs.get(k))
            return f"{part}.{key} is {mine.get(key)!r}, not {theirs.get(key)!r}"
    if member.classes != first.classes:
        return f"its classes {member.classes} differ from {first.classes}"
    for split in ("val", "test"):  # the soup is scored on the first run's: the same images
        mine, theirs = member.splits.get(split), first.splits.get(split)
        if mine != theirs and mine is not None and theirs is not None:
            return (f"its {split} split holds other images than the first run's (another "
                    "dataset.split_seed or dataset.*?): it may have trained on those")
    if set(member.state) != set(first.state):
        extra = sorted(set(member.state) ^ set(first.state))
        return f"its weights' names differ ({len(extra)} not in both, e.g. {extra[0]})"
    for name, tensor in first.state.items():
        if member.state[name].shape != tensor.shape:
            return (f"{name} has shape {tuple(member.state[name].shape)}, not "
                    f"{tuple(tensor.shape)}")
    return None


def gather_members(args: SoupArgs) -> tuple[list[Member], list[dict[str, str]]]:
    """The runs that share the first one's architecture, and one line for each left out."""
    members = []
    dirs, left_out = member_dirs(args.sweep, args.checkpoint, args.out_dir)
    for run_dir in dirs:
        try:
            member = load_member(run_dir, args.checkpoint)
        except UserError as exc:
            left_out.append({"run": str(run_dir), "why": str(exc)})
            continue
        why = mismatch(member, members[0]) if members else None
        if why is None:
            members.append(member)
        else:
            left_out.append({"run": str(run_dir), "why": why})
    if len(members) < 2:
        raise UserError(f"a soup needs at least 2 runs that share an architecture; {args.sweep} "
                        f"has {len(members)} (and {len(left_out)} left out)")
    return members, left_out


# -- averaging -------------------------------------------------------------------------------
def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating-point tensor over ``states`` (summed in order, then divided);
    other tensors (BatchNorm's ``num_batches_tracked``) as the first state has them."""
    first = states[0]
    soup = {}
    for name, tensor in first.items():
        if not tensor.is_floating_point():
            soup[name] = tensor.clone()
            continue
        total = tensor.clone()
        for state in states[1:]:
            total += state[name]
        soup[name] = total / len(states)
    return soup


# -- measuring ---------------------------------------------------------------------------------
class Scorer:
    """One model of the members' architecture, and the splits a soup is measured on: loads a
    state dict and predicts a split."""

    def __init__(self, first: Member, device: str | None):
        from transferlab.tools.evaluate import eval_dataset, eval_loader

        run = checkpoint_config({"config": first.config})
        model, backbone, image_size = restore_model(run, first.state, len(first.classes))
        self.device = pick_device(device or run.trainer.device)
        self.model: nn.Module = model.to(self.device)
        self.precision = Precision(self.device, run.trainer.amp, inference=True)
        self.run, self.classes = run, first.classes
        self._dataset = lambda split: eval_dataset(run, backbone, image_size, split,
                                                   first.classes)
        self._loader = lambda dataset: eval_loader(dataset, run, self.device)
        self._loaders: dict[str, Any] = {}

    def loader(self, split: str):
        if split not in self._loaders:
            self._loaders[split] = self._loader(self._dataset(split))
        return self._loaders[split]

    def identity(self, split: str) -> str:
        """The split's hash, as a run's data fingerprint has it."""
        from transferlab.feature_cache.identity import dataset_identity

        return dataset_identity(self.loader(split).dataset)

    def predictions(self, state: dict[str, torch.Tensor], split: str) -> Predictions:
        self.model.load_state_dict(state)
        return predict(self.model, self.loader(split), self.device, self.precision, False)

    def measure(self, state: dict[str, torch.Tensor], split: str) -> Measure:
        pred = self.predictions(state, split)
        return Measure(pred.accuracy, pred.loss)


def greedy(members: list[Member], scorer: Scorer, split: str) -> Soup:
    """Wortsman et al.'s greedy soup on ``split``: members by their own measure, best first;
    each added when the soup with it beats the soup without it."""
    for member in members:
        member.measure = scorer.measure(member.state, split)
        log.info("%s: %s acc %.4f, loss %.4f", member.run_dir.name, split,
                 member.measure.accuracy, member.measure.loss)
    ranked = sorted(members, key=lambda m: (m.measure.accuracy, -m.measure.loss), reverse=True)
    chosen, current = [ranked[0]], ranked[0].measure
    steps = [{"run": str(ranked[0].run_dir), "added": True, "measure": current.as_dict()}]
    for member in ranked[1:]:
        candidate = scorer.measure(average([m.state for m in [*chosen, member]]), split)
        added = candidate.beats(current)
        steps.append({"run": str(member.run_dir), "added": added,
                      "measure": candidate.as_dict()})
        log.info("%s %s: soup of %d on %s: acc %.4f, loss %.4f", "added" if added else
                 "not added", member.run_dir.name, len(chosen) + 1, split, candidate.accuracy,
                 candidate.loss)
        if added:
            chosen, current = [*chosen, member], candidate
    return Soup(average([m.state for m in chosen]), chosen, {"steps": steps})


def make_soup(args: SoupArgs) -> tuple[Soup, list[Member], list[dict], Scorer]:
    """The soup of ``args`` and what it was made from: every member, the runs left out, the
    scorer (its model holds the soup's weights afterwards)."""
    if args.method == "greedy" and args.held_out is None:
        raise UserError("method=greedy chooses its members on a held-out split: add "
                        "held_out=test (the runs trained with a test split, e.g. "
                        "dataset.test_fraction=0.1)")
    members, left_out = gather_members(args)
    scorer = Scorer(members[0], args.device)
    if args.method == "greedy":
        soup = greedy(members, scorer, args.held_out)
    else:
        soup = Soup(average([m.state for m in members]), list(members))
        if args.held_out is not None:
            for member in members:
                member.measure = scorer.measure(member.state, args.held_out)
    return soup, members, left_out, scorer


# -- the soup's run directory ----------------------------------------------------------------
def soup_record(args: SoupArgs, soup: Soup, members: list[Member], left_out: list[dict],
                measures: dict[str, Measure]) -> dict[str, Any]:
    """What ``soup.json`` holds."""
    chosen = {id(m) for m in soup.members}
    return {
        "method": args.method, "sweep": str(args.sweep), "checkpoint": args.checkpoint,
        "held_out": args.held_out,
        "members": [{"run": str(m.run_dir), "in_soup": id(m) in chosen,
                     "val_acc": m.val_acc,
                     "measure": m.measure.as_dict() if m.measure else None}
                    for m in members],
        **soup.record,
        "left_out": left_out,
        "soup": {split: measure.as_dict() for split, measure in measures.items()},
    }


def write_soup_run(args: SoupArgs, soup: Soup, scorer: Scorer, record: dict[str, Any],
                   val: Predictions, seconds: float) -> Path:
    """The soup as a run directory: ``checkpoints/best.pt`` (a full checkpoint of the first
    member's config: every tensor in it), ``.hydra/config.yaml``, ``metrics.json`` (val's
    accuracy as its best and final epoch 0: a soup trains no epoch), ``predictions_val.npz``
    and ``soup.json``."""
    out, first = args.out_dir, soup.members[0]
    summary = {"epoch": 0, "val_acc": val.accuracy, "val_loss": val.loss}
    write_sealed(out / "checkpoints" / "best.pt", {
        "format": FORMAT, "model": soup.state, "epoch": 0,
        "stage": {"index": 0, "name": "soup"}, "config": copy.deepcopy(first.config),
        "classes": first.classes, "history": [], "best": summary, "loop": {},
        "soup": {"method": args.method, "members": [str(m.run_dir) for m in soup.members]}})
    (out / ".hydra").mkdir(exist_ok=True)
    (out / ".hydra" / "config.yaml").write_text(yaml.safe_dump(first.config, sort_keys=False))
    save_predictions(out / predictions_file("val"), val, {
        "checkpoint": "best", "epoch": 0, "weights": "raw", "split": "val",
        "classes": first.classes, "identity": scorer.identity("val")})
    metrics = {"status": "completed", "history": [], "best": summary, "final": summary,
               "params": {"total": sum(t.numel() for t in soup.state.values()
                                       if t.is_floating_point())},
               "wall_seconds": seconds, "soup": {k: record[k] for k in ("method", "held_out")},
               "predictions": {"val": {"file": predictions_file("val"), "epoch": 0,
                                       "samples": len(val.targets), "accuracy": val.accuracy}}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / SOUP_JSON).write_text(json.dumps(record, indent=2))
    return out


def soup_run(args: SoupArgs) -> dict[str, Any]:
    """Make the soup, measure it on val (and the held-out split), write its run directory;
    ``soup.json``'s record."""
    started = time.monotonic()
    soup, members, left_out, scorer = make_soup(args)
    val = scorer.predictions(soup.state, "val")
    measures = {"val": Measure(val.accuracy, val.loss)}
    if args.held_out is not None:
        measures[args.held_out] = scorer.measure(soup.state, args.held_out)
    record = soup_record(args, soup, members, left_out, measures)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_soup_run(args, soup, scorer, record, val, time.monotonic() - started)
    return record


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The printed table: every member (its val accuracy, its held-out measure, in or out),
    the runs left out, and the soup's accuracy."""
    held = record["held_out"]
    lines = [f"{'run':<40} {'val acc':>8} {(held or '') + ' acc':>9}  in soup"]
    for m in record["members"]:
        val = f"{m['val_acc']:.4f}" if m["val_acc"] is not None else "n/a"
        acc = f"{m['measure']['accuracy']:.4f}" if m["measure"] else ""
        lines.append(f"{Path(m['run']).name[-40:]:<40} {val:>8} {acc:>9}  "
                     f"{'yes' if m['in_soup'] else 'no'}")
    for item in record["left_out"]:
        lines.append(f"left out {Path(item['run']).name}: {item['why']}")
    soup = ", ".join(f"{split} acc {m['accuracy']:.4f} (loss {m['loss']:.4f})"
                     for split, m in record["soup"].items())
    chosen = sum(m["in_soup"] for m in record["members"])
    lines.append(f"{record['method']} soup of {chosen} run(s): {soup}")
    return lines
