"""Device choice, seeding, mixed precision and where transferlab keeps its caches."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch

from transferlab.config.validate import amp_mode
from transferlab.errors import UserError

CACHE_ENV = "TRANSFERLAB_CACHE_DIR"


def cache_root() -> Path:
    """``$TRANSFERLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/transferlab``
    (``~/.cache/transferlab``): the feature cache's store (``features/``) and the memo of
    dataset splits (``splits/``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transferlab"


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU; otherwise the named device, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown trainer.device {name!r}; use auto, cpu, cuda, cuda:N or mps") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available: use trainer.device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"trainer.device={name} but MPS is not available: use trainer.device=auto")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class Precision:
    """Autocast (+ gradient scaling for fp16) as ``trainer.amp`` asks on ``device``.

    * ``auto``: on CUDA bf16 where supported, else fp16; full precision elsewhere;
    * ``off``: full precision (float32) everywhere;
    * ``bf16``: autocast to bfloat16 on CUDA (where supported) or on the CPU;
    * ``fp16``: autocast to float16 with a GradScaler, on CUDA only.

    A mode this device cannot run is a :class:`UserError` for training; with ``inference=True``
    (evaluate, predict, feature export on another device than the run's) it falls back to full
    precision instead, since nobody asked for that mode on this device.
    """

    def __init__(self, device: torch.device, mode: str | bool = "auto", *,
                 inference: bool = False):
        self.mode = amp_mode(mode)
        self.device_type = device.type
        self.dtype: torch.dtype | None = self._dtype(device, self.mode, inference)
        self.enabled = self.dtype is not None
        use_scaler = self.dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    @staticmethod
    def _dtype(device: torch.device, mode: str, inference: bool) -> torch.dtype | None:
        cuda = device.type == "cuda"
        bf16_ok = device.type == "cpu" or (cuda and torch.cuda.is_bf16_supported())
        if mode == "off":
            return None
        if mode == "auto":
            if not cuda:
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if mode == "bf16" and bf16_ok:
            return torch.bfloat16
        if mode == "fp16" and cuda:
            return torch.float16
        if inference:
            return None
        if mode == "fp16":
            raise UserError(f"trainer.amp=fp16 needs CUDA, not {device.type}: use "
                            "trainer.amp=bf16 (CPU autocast) or trainer.amp=off")
        raise UserError(f"trainer.amp=bf16 is not supported on {device}: use trainer.amp=fp16 "
                        "(CUDA) or trainer.amp=off")

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def label(self) -> str:
        return {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[self.dtype] \
            if self.enabled else "32"


def rng_state() -> dict:
    """Every RNG's state, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (CUDA's only where it was saved and is here)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def runtime_record() -> dict:
    """What a run's numbers depend on beyond its config: the versions of Python, torch,
    torchvision and transferlab, and torch's intra-op threads (a CPU run's reductions split by
    them: the same seed with another thread count is not bit-identical)."""
    versions = {}
    for name in ("torch", "torchvision", "transferlab"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), **versions,
            "threads": torch.get_num_threads()}


def runtime_changes(before: dict | None, now: dict) -> list[str]:
    """``key a -> b`` for each entry of :func:`runtime_record` that differs (none when the run
    recorded none)."""
    if not isinstance(before, dict):
        return []
    return [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
