"""Checkpoints that hold only what changed: the tensors of a state dict that differ from the
pretrained weights the run started from, plus a ``source`` record naming the omitted ones.

A run whose backbone weights come from its zoo or package (``backbone.pretrained=true``, no
``weights_path``) can build those weights again from its saved config. Its checkpoints
(``trainer.checkpoint_weights=changed``) leave out every tensor that is still bit-identical
to them; the record keeps, for each tensor left out, the backbone tensor it is and that
tensor's fingerprint (:func:`fingerprint`). A reader rebuilds the pretrained backbone,
checks each fingerprint and puts the tensors back (:func:`complete`): a source that changed
(another version of the weights package) is refused in one line, never loaded silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from transferlab.errors import UserError

SOURCE_FORMAT = "transferlab-source/1"
# model key -> (backbone state-dict key, fingerprint of the pretrained tensor)
Source = dict[str, tuple[str, str]]


@dataclass
class WeightsSource:
    """What a run's checkpoints may leave out: its pretrained tensors by model key (with
    their backbone key and fingerprint), and where the weights came from
    (:attr:`transferlab.backbones.Backbone.weights`)."""

    tensors: Source
    weights: str

    def record(self, omitted: dict[str, list[str]]) -> dict[str, Any]:
        """A checkpoint's ``source``: its format, where the pretrained weights came from, and
        the tensors left out."""
        return {"format": SOURCE_FORMAT, "weights": self.weights, "tensors": omitted}


class SourceChanged(UserError):
    """A tensor a checkpoint left out is not, in the rebuilt pretrained weights, the one it
    was saved against."""


def fingerprint(tensor: torch.Tensor) -> str:
    """A hash of the tensor's dtype, shape and bytes (any device, any dtype, any memory
    format: the bytes are taken in the tensor's logical order)."""
    t = tensor.detach()
    data = t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()
    h = hashlib.blake2b(data, digest_size=12)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    return h.hexdigest()


def split(state: dict[str, torch.Tensor], source: Source,
          omitted: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that differ from ``source`` (the rest are left out and added
    to ``omitted``: model key -> [backbone key, fingerprint])."""
    kept = {}
    for key, tensor in state.items():
        origin = source.get(key)
        if origin is not None and fingerprint(tensor) == origin[1]:
            omitted[key] = list(origin)
        else:
            kept[key] = tensor
    return kept


def is_delta(ckpt: dict) -> bool:
    """Whether a checkpoint left tensors out (a full one, or an older one, did not)."""
    source = ckpt.get("source")
    return isinstance(source, dict) and bool(source.get("tensors"))


def check_record(source: Any, where: str) -> dict[str, list[str]]:
    """The omitted tensors of a checkpoint's ``source`` record, checked to be one this
    version reads."""
    if not isinstance(source, dict) or source.get("format") != SOURCE_FORMAT:
        found = source.get("format") if isinstance(source, dict) else source
        raise UserError(f"{where}: its weights are stored relative to a source of format "
                        f"{found!r}, this version reads {SOURCE_FORMAT!r}: use the transferlab "
                        "version that wrote it")
    return source["tensors"]


def complete(state: dict[str, torch.Tensor], source: Any,
             pretrained: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``state`` with the tensors its checkpoint left out put back: copies of the
    ``pretrained`` backbone's (by backbone key), each checked against its fingerprint first.
    A state dict that omits nothing comes back as it is."""
    tensors = check_record(source, where)
    missing = [k for k in tensors if k not in state]
    if not missing:
        return state
    full = dict(state)
    for key in missing:
        name, expected = tensors[key]
        tensor = pretrained.get(name)
        found = "missing" if tensor is None else fingerprint(tensor)
        if found != expected:
            raise SourceChanged(
                f"{where}: {key} was left out as equal to the pretrained tensor {name} of "
                f"{source.get('weights', 'the backbone')}, but the rebuilt one is {found} "
                f"(fingerprint {expected} when saved): the pretrained weights changed (another "
                "version of the weights package or cache?); install the version the run "
                "trained with")
        full[key] = tensor.detach().clone()
    return full
