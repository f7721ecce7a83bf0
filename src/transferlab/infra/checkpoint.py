"""Checkpoint files: the one reader of every weights file (``weights_only=True``), and the
writer of a run's checkpoints (model, optimizer, stage, RNG, history: enough to resume).

A checkpoint written here is sealed: the file is ``torch.save``'s zip archive whose comment
(the archive's last bytes) is ``transferlab-sha256:<hex>``, the SHA-256 of every byte before
it. Any zip reader (``torch.load`` included) still reads it; :func:`read_file` checks the
digest before loading, so a damaged file is refused in one line instead of resuming or
evaluating silently wrong weights. Files without the seal (written by an earlier version, or
by anything else) load unchecked.

A run's checkpoint may leave out the tensors still equal to its pretrained weights
(:mod:`transferlab.infra.delta`, ``trainer.checkpoint_weights=changed``): its format is then
:data:`FORMAT_DELTA` and its ``source`` says what to rebuild and check.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.infra.delta import WeightsSource, split
from transferlab.infra.run_dirs import fsync_dir
from transferlab.infra.runtime import rng_state

FORMAT = "transferlab-checkpoint/2"  # /2: the loop state a resume needs (``loop``)
FORMAT_DELTA = "transferlab-checkpoint/3"  # /3: /2 leaving out pretrained tensors (``source``)
FORMATS = (FORMAT, FORMAT_DELTA)  # what this version reads
# Where the tensors of a checkpoint dict live, tried in order.
STATE_KEYS = ("state_dict", "model_state_dict", "model")
EXPECTED = ("a file written by torch.save holding a state dict (a transferlab checkpoint, "
            "a torchvision/timm .pth, a Lightning .ckpt) or a .safetensors file")
SEAL = b"transferlab-sha256:"  # the zip comment of a sealed checkpoint: this, then 64 hex digits
SEAL_LENGTH = len(SEAL) + 64
_EOCD = b"PK\x05\x06"  # a zip archive's end record: 22 bytes, the last 2 its comment's length
_CHUNK = 1 << 20


class CorruptCheckpoint(UserError):
    """A sealed checkpoint whose bytes no longer match the digest written with them."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def _digest(f, size: int) -> str:
    """The SHA-256 of the first ``size`` bytes of the open file ``f``."""
    h = hashlib.sha256()
    f.seek(0)
    while size > 0:
        chunk = f.read(min(_CHUNK, size))
        if not chunk:
            break
        h.update(chunk)
        size -= len(chunk)
    return h.hexdigest()


def seal(f) -> None:
    """Append the digest to the zip archive ``torch.save`` just wrote into ``f`` (open for
    reading and writing): the archive's comment becomes ``SEAL`` + the SHA-256 of every byte
    before it (the comment's length field included)."""
    f.seek(-22, os.SEEK_END)
    end = f.read(22)
    if not end.startswith(_EOCD) or end[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end its file with a zip end record")
    f.seek(-2, os.SEEK_END)
    f.write(SEAL_LENGTH.to_bytes(2, "little"))
    f.flush()
    size = f.seek(0, os.SEEK_END)
    digest = _digest(f, size)
    f.seek(0, os.SEEK_END)
    f.write(SEAL + digest.encode())


def check_seal(path: Path) -> bool:
    """Whether ``path`` is sealed (True) or not (False: an older or foreign file). A sealed
    file whose bytes changed raises :class:`CorruptCheckpoint`."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < SEAL_LENGTH + 22:
            return False
        f.seek(size - SEAL_LENGTH)
        tail = f.read(SEAL_LENGTH)
        if not tail.startswith(SEAL):
            return False
        if _digest(f, size - SEAL_LENGTH) == tail[len(SEAL):].decode("ascii", "replace"):
            return True
    others = sorted(p.name for p in path.parent.glob("*.pt") if p != path)
    instead = (f"use another of its checkpoints ({', '.join(others)}) or train again"
               if others else "train again")
    raise CorruptCheckpoint(f"{path} is corrupt: its bytes do not match the SHA-256 written "
                            f"with it (a damaged disk or an interrupted copy); {instead}", path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return " ".join(text.splitlines()[0].split()).split(". ")[0][:200]  # its first sentence


def read_file(path: str | Path, option: str = "checkpoint") -> dict[str, Any]:
    """The dict a weights file holds, loaded on the CPU with ``weights_only=True`` (no code
    in the file runs), or the tensors of a ``.safetensors`` file. Anything missing, unreadable
    or not a dict is a one-line :class:`UserError` naming ``option`` and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{option}: {path} does not exist (expected {EXPECTED})")
    if path.suffix != ".safetensors":
        try:
            check_seal(path)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(f"{option}: {exc}", path) from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, text, pickles of arbitrary objects
        with path.open("rb") as f:
            head = f.read(16)
        if path.suffix != ".safetensors" and not head.startswith((b"PK\x03\x04", b"\x80")):
            why = f"not a torch.save file: it starts with {head[:12]!r}"  # neither zip nor pickle
        elif isinstance(exc, pickle.UnpicklingError):
            why = ("it holds objects other than tensors and plain containers, which are not "
                   "loaded for safety (weights_only=True): re-save only its state dict, e.g. "
                   "torch.save(ckpt['state_dict'], 'weights.pt')")
        else:
            why = f"{type(exc).__name__}: {_first_line(exc)}"
        raise UserError(f"{option}: {path} is not a readable checkpoint ({why}); expected "
                        f"{EXPECTED}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{option}: {path} holds a {type(obj).__name__}, not a dict; "
                        f"expected {EXPECTED}")
    return obj


def read_state_dict(path: str | Path, option: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The named tensors of any weights file (see :func:`read_file`): a dict holding
    ``state_dict``, ``model_state_dict`` or ``model`` is unwrapped; entries that are not
    tensors are skipped; a file without tensors is a one-line error."""
    return state_dict_of(read_file(path, option), path, option)


def state_dict_of(obj: dict[str, Any], path: str | Path,
                  option: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The named tensors of ``obj``, the dict the weights file at ``path`` holds (see
    :func:`read_state_dict`)."""
    for key in STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8])) or "nothing"
        raise UserError(f"{option}: {Path(path).expanduser()} holds no tensors (its keys: "
                        f"{keys}); expected {EXPECTED}")
    return tensors


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A transferlab checkpoint (its model, config, classes, history...)."""
    return read_file(path, option="checkpoint")


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, stage_index: int, stage_name: str, config: dict,
                    history: list[dict], best: dict | None, classes: list[str],
                    loop: dict[str, Any] | None = None,
                    ema: dict[str, Any] | None = None,
                    source: WeightsSource | None = None) -> None:
    """Write atomically and durably (a crash or SIGKILL mid-write never leaves a truncated
    ``last.pt``: a temporary file, fsync, rename, fsync of the folder), sealed with the
    SHA-256 of its bytes (:func:`seal`).

    ``epoch`` is the last completed epoch; ``loop`` holds what an exact resume needs: the
    global step, the stage schedule's step, the data
    fingerprint, and for a checkpoint written mid-epoch (an interrupt) the epoch's progress.
    ``ema``: the EMA of the weights (:meth:`transferlab.engine.ema.WeightsEma.state`), when the run
    keeps one. ``source``: the run's pretrained tensors, left out of every state dict the
    checkpoint holds (the model, the EMA, early stopping's best weights) where still equal
    (:func:`leave_out`)."""
    payload = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "stage": {"index": stage_index, "name": stage_name},
        "config": config,
        "classes": classes,
        "history": history,
        "best": best,
        "rng": rng_state(),
        "loop": loop or {},
    }
    if ema is not None:
        payload["ema"] = ema
    if source is not None:
        leave_out(payload, source)
    write_sealed(path, payload)


def write_sealed(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` of ``payload`` at ``path``, sealed (:func:`seal`), atomically and
    durably: a temporary file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w+b") as f:
        torch.save(payload, f)
        seal(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def leave_out(payload: dict[str, Any], source: WeightsSource) -> None:
    """Leave out of ``payload``'s state dicts the tensors equal to ``source``'s; if any was,
    the payload says so (its format :data:`FORMAT_DELTA`, its ``source`` record)."""
    omitted: dict[str, list[str]] = {}
    payload["model"] = split(payload["model"], source.tensors, omitted)
    if payload.get("ema") is not None:
        payload["ema"] = {**payload["ema"],
                          "model": split(payload["ema"]["model"], source.tensors, omitted)}
    stopping = payload["loop"].get("early_stopping") or {}
    if stopping.get("best_model") is not None:
        payload["loop"] = {**payload["loop"], "early_stopping": {
            **stopping, "best_model": split(stopping["best_model"], source.tensors, omitted)}}
    if omitted:
        payload.update(format=FORMAT_DELTA, source=source.record(omitted))


def save_epoch_checkpoints(run_dir: Path, improved: bool, keep_every: bool = False,
                           improved_ema: bool = False, **state: Any) -> None:
    """``checkpoints/last.pt`` after every epoch, ``best.pt`` too when the epoch improved,
    ``best_ema.pt`` when its EMA weights improved, and ``epoch_<N>.pt`` with ``keep_every``
    (``trainer.checkpoint.keep=all``)."""
    folder = Path(run_dir) / "checkpoints"
    save_checkpoint(folder / "last.pt", **state)
    for name, better in (("best", improved), ("best_ema", improved_ema)):
        if better:
            shutil.copyfile(folder / "last.pt", folder / f"{name}.pt.tmp")
            os.replace(folder / f"{name}.pt.tmp", folder / f"{name}.pt")
    if keep_every:
        shutil.copyfile(folder / "last.pt", folder / f"epoch_{state['epoch']}.pt")
