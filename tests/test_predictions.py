"""The per-image predictions a classification run records at its end
(:mod:`transferlab.run.predictions`): of best.pt's weights, however the run got there."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from transferlab.cli.evaluate import main as eval_main
from transferlab.run import train
from transferlab.run.predictions import (
    EVAL_PREDICTIONS,
    BestWeights,
    load_predictions,
    swapped_in,
)

from .conftest import TINY, compose_train


def test_the_best_epochs_weights_are_kept_per_stage_and_swapped_in_and_back():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model[0].weight.requires_grad_(False)  # frozen in this stage: not kept
    loop = SimpleNamespace(inputs=SimpleNamespace(model=model),
                           plan=SimpleNamespace(index=1), epoch=4)
    kept = BestWeights()
    kept.keep(loop)
    assert set(kept.state) == {"0.bias", "1.weight", "1.bias", "1.running_mean",
                               "1.running_var", "1.num_batches_tracked"}
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].bias.add_(1.0)
        model[1].running_mean.add_(2.0)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    assert kept.of(loop, 4) is kept.state
    assert kept.of(loop, 3) is None  # another epoch's
    assert kept.of(SimpleNamespace(plan=SimpleNamespace(index=2)), 4) is None  # a later stage
    with swapped_in(model, kept.of(loop, 4)):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, best[name]), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), name


@pytest.mark.slow
def test_a_best_epoch_in_an_earlier_stage_is_scored_from_best_pt(tmp_path):
    """Stage 2 at a destructive LR: the best epoch is stage 1's, whose weights are no longer in
    memory; the run restores best.pt and its files (val, and the test split it holds out)
    equal transferlab-eval's."""
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_train([*TINY, "freeze=two_stage", "freeze.head_epochs=2",
                             "freeze.finetune_epochs=1", "optimizer.lr=0.03",
                             "freeze.finetune_lr_mult=3000",
                             "dataset.samples_per_class=20", "dataset.test_fraction=0.1"]),
              run_dir)
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best, final = metrics["best"], metrics["final"]
    assert best["epoch"] < final["epoch"] == 3, (best, final)  # the case under test
    own = load_predictions(run_dir / "predictions_val.npz")
    assert own.header["epoch"] == best["epoch"]
    assert own.accuracy == pytest.approx(best["val_acc"], abs=2 / 360)  # cache's float16
    assert own.accuracy != pytest.approx(final["val_acc"], abs=0.05)
    assert eval_main([f"run={run_dir}"]) == 0
    again = load_predictions(run_dir / EVAL_PREDICTIONS)
    assert np.array_equal(again.predicted, own.predicted)
    assert again.label_prob == pytest.approx(own.label_prob, abs=1e-5)
    test = load_predictions(run_dir / "predictions_test.npz")  # its test split too
    assert test.header["split"] == "test" and test.header["epoch"] == best["epoch"]
    assert metrics["predictions"]["test"]["samples"] == len(test.targets) > 0
    assert eval_main([f"run={run_dir}", "split=test"]) == 0
    assert np.array_equal(load_predictions(run_dir / EVAL_PREDICTIONS).predicted, test.predicted)
