"""Shared fixtures: Hydra composition on the real conf/ tree, tiny configs, data locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Overrides that make any run short: 1 epoch of digits at 32 px, no loader processes.
SHORT = ["dataset.image_size=32", "trainer.epochs=1", "trainer.num_workers=0",
         "trainer.progress=false"]
# ... and tiny: a random-weight timm test model (about 100k parameters).
TINY = ["backbone=timm", "backbone.name=test_efficientnet", "backbone.pretrained=false", *SHORT]


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides) -> the DictConfig transferlab-train would run."""

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides or []))

    yield _compose
    GlobalHydra.instance().clear()


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
