"""Fetching pretrained weights, with a one-line error when they are neither on disk nor online."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from transferlab.errors import UserError


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` resolves (a fast check before a download that would retry for a minute)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def torchvision_weights_file(weights) -> Path:
    """Where torchvision keeps (or downloads) the file of a weight enum member."""
    return torch_hub_checkpoints() / os.path.basename(urlparse(weights.url).path)


def load_torchvision_state_dict(weights, model_name: str) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision weight enum member, from TORCH_HOME or downloaded."""
    target = torchvision_weights_file(weights)
    filename = target.name
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as exc:  # URLError, hash or unpickling errors
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"pretrained weights for {model_name} ({weights}) are not on disk and could not be "
            f"downloaded ({reason}): download {weights.url} and put {filename} at {target} "
            f"(TORCH_HOME moves the cache) or load it from anywhere with "
            f"backbone.weights_path=<file>, or set backbone.pretrained=false to train from scratch"
        ) from None


def timm_weights_hint(model_name: str, hf_hub_id: str | None) -> str:
    where = f"Hugging Face repo {hf_hub_id}" if hf_hub_id else f"timm's weights for {model_name}"
    return (
        f"download {where} on a machine with internet and copy it into the Hugging Face cache "
        f"{hf_cache_dir()} (HF_HOME moves it) or load it from anywhere with "
        f"backbone.weights_path=<file> (its model.safetensors or a .pth state dict), or set "
        f"backbone.pretrained=false"
    )


def load_weights_file(model: torch.nn.Module, path: str, model_name: str) -> None:
    """Load ``backbone.weights_path``: the full state dict of the original model (classifier
    included, as the download would be) into ``model``; any mismatch is a one-line error."""
    from transferlab.infra.checkpoint import read_state_dict

    state = read_state_dict(path, option="backbone.weights_path")
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            k = shapes[0]
            problems.append(f"{len(shapes)} shape mismatches (e.g. {k}: file "
                            f"{tuple(state[k].shape)}, model {tuple(target[k].shape)})")
        for what, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                problems.append(f"{len(names)} {what} tensors (e.g. {', '.join(names[:3])})")
        raise UserError(
            f"backbone.weights_path: {path} is not a state dict of {model_name}: "
            f"{'; '.join(problems)}; give the original model's full weights, or restore part of "
            f"a checkpoint with backbone.init.path (see docs/weights.md, Bring your own weights)"
        )
    model.load_state_dict(state)
