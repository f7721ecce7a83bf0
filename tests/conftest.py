"""Shared fixtures: Hydra composition on the real conf/ tree, tiny configs, data locations."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from transferlab.backbones import build_backbone, probe_features
from transferlab.config import BackboneConfig, HeadConfig
from transferlab.config.store import register_configs
from transferlab.heads import build_head
from transferlab.model import TransferModel

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Overrides that make any run short: 1 epoch of digits at 32 px, no loader processes.
SHORT = ["dataset.image_size=32", "trainer.epochs=1", "trainer.num_workers=0",
         "trainer.progress=false"]
# ... and tiny: a random-weight timm test model (about 100k parameters).
TINY = ["backbone=timm", "backbone.name=test_efficientnet", "backbone.pretrained=false", *SHORT]


# The tiny model of the mechanics tests: its classes and input size.
TINY_CLASSES = 3
TINY_SIZE = 32


@pytest.fixture(autouse=True, scope="session")
def _sigint_as_a_terminal_gives_it():
    """A shell without job control that starts ``pytest &`` makes it ignore SIGINT, and every
    process the tests start would inherit that (a Python started so never raises
    KeyboardInterrupt): the Ctrl-C tests would then test the shell. They get SIGINT as a
    terminal gives it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_dir(tmp_path_factory):
    """The tests' feature cache store: one folder for the session (shared by its runs, as a
    user's runs share ~/.cache), never the user's own."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TRANSFERLAB_CACHE_DIR")
    os.environ["TRANSFERLAB_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TRANSFERLAB_CACHE_DIR", None)
    else:
        os.environ["TRANSFERLAB_CACHE_DIR"] = old


def compose_train(overrides: list[str] | None = None):
    """The DictConfig that ``transferlab-train <overrides>`` composes from conf/."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides) -> the DictConfig transferlab-train would run."""
    return compose_train


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _pristine(head: str):
    torch.manual_seed(0)
    backbone = build_backbone(
        BackboneConfig(name="test_efficientnet", source="timm", pretrained=False)
    )
    shape = probe_features(backbone, TINY_SIZE)
    model = TransferModel(backbone.module, build_head(HeadConfig(name=head), shape, TINY_CLASSES))
    return model, backbone


def tiny_model(head: str = "linear"):
    """(TransferModel, Backbone): timm's ~100k-parameter test EfficientNet (with BatchNorm) and
    a new head for TINY_CLASSES classes.

    Built once per head and deep-copied, so every test gets fresh, identical weights.
    """
    model, backbone = copy.deepcopy(_pristine(head))
    assert model.backbone is backbone.module
    return model, backbone


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """The tiny model trained once for the whole session (2 epochs of digits at 32 px, lr
    0.03, on one thread): the run directory that eval, predict, export and restore tests read.
    Tests get a copy (:func:`tiny_run`), so what one writes into it no other sees."""
    from transferlab.run import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("tiny_trained") / "run"
        train(compose_train([*TINY, "trainer.epochs=2", "optimizer.lr=0.03"]), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tiny_trained, tmp_path_factory) -> Path:
    """This module's copy of the session's tiny trained run (:func:`tiny_trained`)."""
    copy = tmp_path_factory.mktemp("tiny_run") / "run"
    shutil.copytree(tiny_trained, copy)
    return copy


def hymenoptera_root() -> Path | None:
    base = os.environ.get("TRANSFERLAB_DATA_DIR")
    if not base:
        return None
    root = Path(base) / "hymenoptera"
    return root if (root / "train").is_dir() and (root / "val").is_dir() else None


@pytest.fixture
def hymenoptera() -> Path:
    root = hymenoptera_root()
    if root is None:
        pytest.skip("hymenoptera data not found: set TRANSFERLAB_DATA_DIR to the folder that "
                    "holds hymenoptera/{train,val} (.ci/run sets it to ../shared/data)")
    return root


def params_under(module: nn.Module, path: str, prefix: str = "backbone") -> set[str]:
    """Full names of the parameters at a module or parameter path (from the module tree)."""
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        module.get_parameter(path)  # raises if it is neither
        return {f"{prefix}.{path}"}
    return {f"{prefix}.{path}.{n}" for n, _ in sub.named_parameters()}


def cli(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    """``transferlab-train <args>`` in a subprocess (the installed entry point's module)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_SWE")}
    environment.update({"HYDRA_FULL_ERROR": "0", **env})
    return subprocess.run([sys.executable, "-m", "transferlab.train", *args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=300)
