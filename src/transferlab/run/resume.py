"""Going on with an interrupted run from its ``checkpoints/last.pt``, exactly.

The checkpoint holds the model (and the EMA of its weights, ``trainer.ema``), the optimizer of
the stage it was written in, the RNG states, the stage schedule's position, the global step,
the record so far and, when it was written by a clean stop (SIGINT / SIGTERM) part-way through
an epoch, how far that epoch got. A resumed run rebuilds everything from the saved config,
puts that state back and trains the rest: it ends with the same weights as a run that was
never interrupted (bit for bit on the CPU with ``trainer.deterministic=true``, augmentation
included: each sample's augmentation is drawn from (seed, epoch, index)).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.config.validate import (
    SESSION_KEYS,
    amp_mode,
    is_session_override,
    override_key,
)
from transferlab.errors import UserError
from transferlab.infra.checkpoint import FORMATS, CorruptCheckpoint, load_checkpoint
from transferlab.infra.delta import complete, is_delta
from transferlab.infra.liveness import run_status
from transferlab.registry import TASKS, load_builtins

# Overrides a resume takes: they cannot change the result (or extend the last stage).
EXTENDING = ("trainer.epochs", "freeze.finetune_epochs")  # give the last stage more epochs
RUNTIME = ("trainer.progress", "trainer.progress_seconds", "trainer.num_workers")  # how, not what
PAUSE = SESSION_KEYS[1]  # trainer.pause_after_epoch: how far a session goes (not kept)
RESUME_OVERRIDES = (*RUNTIME, PAUSE, *EXTENDING)


@dataclass
class ResumePoint:
    """Where a resumed run goes on (read from a checkpoint)."""

    epoch: int  # the last completed epoch
    stage_index: int  # the stage whose optimizer the checkpoint holds
    step: int  # optimizer steps so far
    schedule_step: int  # steps of that stage so far
    model: dict  # the model's state dict
    optimizer: dict
    rng: dict
    history: list[dict]
    best: dict | None
    data: dict
    partial: dict | None = None  # an epoch stopped part-way: {epoch, steps, sums, seconds}
    ema: dict | None = None  # the EMA of the weights (trainer.ema)
    early_stopping: dict | None = None  # the stage's early-stopping state (its counters)
    l2sp_w0: float | None = None  # trainer.regularize=l2sp: the fingerprint of its w0
    world_size: int = 1  # the processes that trained it (DDP)
    rng_ranks: list[dict] | None = None  # DDP: the RNG states of ranks 1, 2, ...
    ledger: dict | None = None  # the freeze ledger's fingerprints of the stage (none: older)
    source: dict | None = None  # the pretrained tensors the checkpoint left out (none: full)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> ResumePoint:
        loop = ckpt["loop"]
        return cls(epoch=int(ckpt["epoch"]), stage_index=int(ckpt["stage"]["index"]),
                   step=int(loop["step"]), schedule_step=int(loop["schedule_step"]),
                   model=ckpt["model"],
                   optimizer=ckpt["optimizer"], rng=ckpt["rng"],
                   history=list(ckpt["history"]), best=ckpt["best"], data=loop["data"],
                   partial=loop.get("partial"), ema=ckpt.get("ema"),
                   early_stopping=loop.get("early_stopping"), l2sp_w0=loop.get("l2sp_w0"),
                   world_size=int(loop.get("world_size", 1)), rng_ranks=loop.get("rng_ranks"),
                   ledger=loop.get("ledger"), source=ckpt["source"] if is_delta(ckpt) else None)

    def put_back(self, pretrained: dict, where: str) -> None:
        """Put back into every state dict the tensors the checkpoint left out, from the
        rebuilt backbone's ``pretrained`` state dict, each checked against its fingerprint
        (:func:`transferlab.infra.delta.complete`)."""
        if self.source is None:
            return
        self.model = complete(self.model, self.source, pretrained, where)
        if self.ema is not None:
            self.ema = {**self.ema,
                        "model": complete(self.ema["model"], self.source, pretrained, where)}
        best = (self.early_stopping or {}).get("best_model")
        if best is not None:
            self.early_stopping = {**self.early_stopping,
                                   "best_model": complete(best, self.source, pretrained, where)}

    def rng_of(self, rank: int) -> dict:
        """The RNG states of process ``rank`` when the checkpoint was written."""
        return self.rng if rank == 0 else self.rng_ranks[rank - 1]

    def check_world(self, size: int) -> None:
        """A run goes on with as many processes as it trained with: the global batch (and
        with ``trainer.distributed.scale_lr`` the LRs) depend on the number."""
        if size != self.world_size:
            how = (f"torchrun --nproc_per_node={self.world_size} -m transferlab.train"
                   if self.world_size > 1 else "transferlab-train (without torchrun)")
            raise UserError(f"the run trained on {self.world_size} process(es), this resume has "
                            f"{size}: the global batch would change; resume it as it ran: {how} "
                            "resume=<run dir>")

    def record(self) -> dict[str, Any]:
        """What the run's record goes on from."""
        return {"epoch": self.epoch, "step": self.step, "history": self.history,
                "best": self.best, "partial": self.partial}


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def still_running(status: dict) -> bool:
    """A ``running`` record of another process that is still alive."""
    return run_status(status) == "running" and status.get("pid") != os.getpid()


# What a resume reads from a checkpoint of this format (``loop``: its own keys).
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "stage", "config", "history", "best", "rng",
                   "loop")
LOOP_KEYS = ("step", "schedule_step", "data")


def check_is_run(run_dir: Path) -> None:
    """``run_dir`` is a directory that holds a run."""
    if not run_dir.is_dir():
        raise UserError(f"resume={run_dir}: no such directory")
    if not any((run_dir / name).exists() for name in ("metrics.json", ".hydra", "checkpoints")):
        raise UserError(f"resume={run_dir}: not a transferlab run directory (no metrics.json, "
                        "no checkpoints/last.pt)")


def resume_checkpoint(run_dir: Path, status: dict | None = None) -> dict:
    """``run_dir``'s ``last.pt``, checked to be a whole checkpoint this version resumes.
    ``status``: the run's ``metrics.json`` (what it says the run did, for the messages)."""
    check_is_run(run_dir)
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        raise UserError(f"resume={run_dir}: {_no_checkpoint(run_dir, status or {})}")
    try:
        ckpt = load_checkpoint(path)
    except CorruptCheckpoint:
        raise UserError(f"resume={run_dir}: {path} is corrupt (its bytes do not match the "
                        f"SHA-256 written with it): {_go_back(run_dir)}") from None
    if ckpt.get("format") not in FORMATS:
        raise UserError(f"resume={run_dir}: {path} was written by another transferlab version "
                        f"(format {ckpt.get('format')!r}; this one resumes "
                        f"{' and '.join(map(repr, FORMATS))}); start the run again")
    missing = _missing(ckpt)
    if missing:
        raise UserError(f"resume={run_dir}: {path} has the format tag {ckpt['format']!r} but lacks "
                        f"{', '.join(missing)} (a damaged or edited checkpoint): "
                        f"{_go_back(run_dir)}")
    return ckpt


def _missing(ckpt: dict) -> list[str]:
    """The keys a resume reads that ``ckpt`` lacks (``loop.step``: a key of its ``loop``)."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    for key, inner in (("loop", LOOP_KEYS), ("stage", ("index",))):
        if key in ckpt:
            have = ckpt[key] if isinstance(ckpt[key], dict) else {}
            missing += [f"{key}.{k}" for k in inner if k not in have]
    return missing


def _no_checkpoint(run_dir: Path, status: dict) -> str:
    """Why a run directory without ``checkpoints/last.pt`` cannot be resumed."""
    task = (status.get("hparams") or {}).get("task")
    if isinstance(task, str) and task in TASKS:
        reason = TASKS.builder(task).not_resumable
        if reason:
            return reason
    done = len(status.get("history") or [])
    if done:
        return (f"checkpoints/last.pt is missing, though metrics.json records {done} finished "
                f"epoch(s): it was deleted or moved; put it back, or {_go_back(run_dir)}")
    return "the run saved no checkpoint (no epoch finished): start it again"


def _go_back(run_dir: Path) -> str:
    """How to go on when ``last.pt`` cannot be used: from an earlier checkpoint of the run
    (``epoch_<N>.pt``, ``best.pt``), or again from the start."""
    folder = run_dir / "checkpoints"

    def order(path: Path) -> int:
        tail = path.stem.rpartition("_")[2]
        return int(tail) if tail.isdigit() else -1

    earlier = sorted((p for p in folder.glob("*.pt") if p.name != "last.pt"
                      and (p.stem == "best" or p.stem.startswith("epoch_"))), key=order)
    if not earlier:
        return "it kept no other checkpoint; start the run again"
    names = ", ".join(p.name for p in reversed(earlier))
    return (f"go back to an earlier checkpoint of the run ({names}): cp {earlier[-1]} "
            f"{folder / 'last.pt'}, then resume again; or start the run again")


def resumed_config(saved: dict, overrides: list[str], done_epochs: int) -> dict:
    """The saved config with the overrides a resume takes applied; anything else refused. A
    pause point is the session's own: a resume goes on to the end of the plan unless it is
    given a new one."""
    raw = copy.deepcopy(saved)
    raw["resume"] = None
    raw["trainer"]["pause_after_epoch"] = None
    load_builtins()
    task = TASKS.builder(raw["task"]["name"])
    for item in overrides:
        key, _, value = item.lstrip("+").partition("=")
        key = override_key(item)
        if key not in RESUME_OVERRIDES:
            raise UserError(f"resume takes the run's saved config: {item!r} would change it "
                            f"(a resume takes only {', '.join(RESUME_OVERRIDES)})")
        if key in (*RUNTIME, PAUSE):
            section, field = key.split(".")
            raw[section][field] = None if value == "null" else _value(value)
            continue
        task.extend(raw, key, _value(value))
    total = task.planned_epochs(raw)
    if total is not None and (not isinstance(total, int) or total < done_epochs):
        raise UserError(f"the run has done {done_epochs} epochs: extend it to at least that many "
                        f"(the overrides give {total})")
    pause = raw["trainer"]["pause_after_epoch"]
    if isinstance(pause, int) and pause <= done_epochs:
        raise UserError(f"{PAUSE}={pause}: the run has done {done_epochs} epochs already; give a "
                        f"later pause point, or none to go on to the end")
    return raw


def overrides_extend(overrides: list[str]) -> bool:
    """Whether the overrides give the run more epochs."""
    return any(override_key(o) in EXTENDING for o in overrides)


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_data(saved: dict, now: dict, run_dir: Path) -> None:
    """The data set must be the one the run started with: the same split sizes, classes and,
    where both have one, each split's identity (its images and labels; a checkpoint of an
    earlier version has none)."""
    changes = []
    for split in ("train", "val", "test"):
        if saved.get(split) != now.get(split):
            changes.append(f"{split} {saved.get(split)} -> {now.get(split)} images")
            continue
        before, after = (d.get("identity", {}).get(split) for d in (saved, now))
        if before is not None and after is not None and before != after:
            changes.append(f"{split}: the same {now.get(split)} images by count, but their "
                           "files or labels changed")
    if saved.get("classes") != now.get("classes"):
        changes.append(f"classes {saved.get('classes')} -> {now.get('classes')}")
    if changes:
        raise UserError(f"the data set changed since the run started ({'; '.join(changes)}): a "
                        f"resume would not give the run's result; {fresh_start(run_dir)}")


def fresh_start(run_dir: Path) -> str:
    """How to start the run in ``run_dir`` again, as a new run: its command line, read from
    Hydra's record of its overrides."""
    import shlex

    import yaml

    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        overrides = None
    if not isinstance(overrides, list):
        return "start a new run with the run's overrides"
    return f"start a new run: transferlab-train {shlex.join(str(o) for o in overrides)}".strip()


# --- resume=auto: a sweep launched again goes on where it stopped -------------------------------


def _task_overrides(argv: list[str]) -> list[str]:
    """The config overrides of a command line (no flags, no ``hydra.*``, no ``resume=``)."""
    return sorted(a for a in argv if "=" in a and not a.startswith("-")
                  and not override_key(a).startswith("hydra.") and not is_session_override(a))


def find_sweep(argv: list[str], root: Path = Path("outputs/sweeps")) -> Path | None:
    """The newest sweep directory under ``root`` whose command line had the same overrides
    as ``argv`` (Hydra's ``multirun.yaml`` records them), if any."""
    import yaml

    wanted = _task_overrides(argv)
    found = []
    for record in root.glob("*/*/multirun.yaml"):
        try:
            saved = yaml.safe_load(record.read_text())["hydra"]["overrides"]["task"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
        if _task_overrides([str(s) for s in saved or []]) == wanted:
            found.append(record.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def job_action(run_dir: Path, pause: int | None = None) -> str:
    """What ``resume=auto`` does with a sweep job's directory: ``skip`` (completed, or paused
    at or after ``pause``, the pause point the job is launched with now), ``resume`` (a
    checkpoint of an unfinished run), ``busy`` (still going), or ``start``."""
    status = read_status(run_dir)
    if reached(status, pause):
        return "skip"
    if still_running(status):
        return "busy"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "resume"
    return "start"


def reached(status: dict, pause: int | None) -> bool:
    """Whether a run's record has nothing to do before ``pause`` (the pause point a job is
    launched with; None: the end): it completed, or it is paused at or after ``pause``."""
    return status.get("status") == "completed" or paused_at(status) >= (pause or math.inf)


def paused_at(status: dict) -> float:
    """The epoch a ``paused`` run's record stopped at (-inf for any other status)."""
    if status.get("status") != "paused":
        return -math.inf
    return float((status.get("paused") or {}).get("epoch", -math.inf))


def requeued_action(run_dir: Path, pause: int | None = None) -> str | None:
    """What a submitit job does with its own job directory when it starts: ``skip`` (a
    completed run, or one paused at or after ``pause``), ``resume`` (the checkpoint of an
    earlier attempt: the job was requeued after preemption or its time limit), None (a new
    job: train). No ``busy``: the scheduler runs one attempt of a job at a time, so a
    ``running`` record is the earlier attempt's (killed), or another task's of this one."""
    if reached(read_status(run_dir), pause):
        return "skip"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "resume"
    return None


def clear_unfinished(run_dir: Path) -> None:
    """Remove what a run that saved no checkpoint left (it starts again in the same place)."""
    import shutil

    for name in ("tb", "checkpoints"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.json", "learning_curves.png"):
        (run_dir / name).unlink(missing_ok=True)


def same_config(saved: dict, now: dict) -> list[str]:
    """The keys whose values differ between a job's saved config and the one composed now."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat({k: v for k, v in saved.items() if k != "resume"}), \
        flat({k: v for k, v in now.items() if k != "resume"})
    for d in (a, b):  # how far a session goes is not the run's config
        d.pop(PAUSE, None)
    for d in (a, b):  # a run saved before trainer.amp named a mode holds True / False
        if isinstance(d.get("trainer.amp"), bool):
            d["trainer.amp"] = amp_mode(d["trainer.amp"])
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
