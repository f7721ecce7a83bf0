"""Transfer on real photos: the ants-vs-bees set with the default (offline ImageNet) backbone."""

from __future__ import annotations

import json

import pytest

from transferlab.run import train


@pytest.mark.slow
def test_linear_probe_on_hymenoptera(compose_cfg, hymenoptera, tmp_path):
    cfg = compose_cfg([
        "dataset=hymenoptera", f"dataset.root={hymenoptera}", "freeze=linear_probe",
        "trainer.epochs=2", "trainer.progress=false",
    ])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    # 244 training photos: the GIF placeholder is skipped and reported.
    assert [p.endswith("imageNotFound.gif") for p in metrics["skipped_files"]] == [True]
    assert metrics["best"]["val_acc"] >= 0.92, metrics["history"]
