"""L2-SP (trainer.regularize=l2sp): the penalty, its gradients, its pull in training, its record
and its resume (issue #15)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from transferlab.config import RegularizeConfig, compose_config, load_config
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.errors import UserError
from transferlab.infra.runtime import Precision
from transferlab.run import resume_run, train
from transferlab.staging.regularize import L2SP

from .conftest import TINY, TINY_CLASSES, TINY_SIZE, compose_train, tiny_model

CPU = torch.device("cpu")
L2SP_RUN = [*TINY, "dataset.samples_per_class=6", "freeze=none", "optimizer.weight_decay=0",
            "trainer.regularize.name=l2sp", "trainer.regularize.alpha=0.5"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _moved(model: nn.Module, by: float = 0.05) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * by)


def test_zero_at_the_start_and_gradients_point_back_to_w0():
    model, _ = tiny_model()
    penalty = L2SP(model, alpha=0.3, beta=0.0)
    assert float(penalty().detach()) == 0.0  # w = w0
    start = [p.detach().clone() for p in model.backbone.parameters()]
    _moved(model)
    model.zero_grad()
    value = penalty()
    value.backward()
    value = value.detach()
    expected = sum(0.3 / 2 * float((p.detach() - w0).pow(2).sum())
                   for p, w0 in zip(model.backbone.parameters(), start, strict=True))
    assert float(value) == pytest.approx(expected, rel=1e-5) and expected > 0
    for p, w0 in zip(model.backbone.parameters(), start, strict=True):
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - w0))
    assert all(p.grad is None for p in model.head.parameters())  # beta=0: no head term


def test_the_head_term_is_plain_l2_and_frozen_weights_add_nothing():
    model, _ = tiny_model()
    penalty = L2SP(model, alpha=1.0, beta=0.2)
    _moved(model)
    for p in model.backbone.parameters():
        p.requires_grad_(False)  # frozen: no pull, however far from w0
    model.zero_grad()
    value = penalty()
    value.backward()
    value = value.detach()
    head = list(model.head.parameters())
    assert float(value) == pytest.approx(
        sum(0.2 / 2 * float(p.detach().pow(2).sum()) for p in head), rel=1e-5)
    for p in head:
        torch.testing.assert_close(p.grad, 0.2 * p.detach())
    assert L2SP.of(RegularizeConfig(), model) is None  # name=none


def test_a_training_step_pulls_the_backbone_back_toward_w0():
    model, _ = tiny_model()
    model.eval()  # BatchNorm statistics stay put: only the weights move
    penalty = L2SP(model, alpha=10.0, beta=0.0)
    start = [p.detach().clone() for p in model.backbone.parameters()]
    _moved(model, 0.05)

    def distance() -> float:
        return sum(float((p.detach() - w0).pow(2).sum())
                   for p, w0 in zip(model.backbone.parameters(), start, strict=True))

    before = distance()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, TINY_SIZE, TINY_SIZE, generator=g),
                torch.randint(0, TINY_CLASSES, (4,), generator=g)) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    stats = train_epoch(model, batches, CrossEntropy(), optimizer,
                        EpochContext(CPU, Precision(CPU, False)), penalty=penalty)
    after = distance()
    # lr * alpha = 0.5: each step halves w - w0 (the data's gradients aside), so 3 steps leave
    # a 64th of the squared distance, and the mean penalty is over d, d/4 and d/16
    assert after == pytest.approx(before / 64, rel=0.2), (before, after)
    assert stats.penalty == pytest.approx(10.0 / 2 * before * (1 + 1 / 4 + 1 / 16) / 3, rel=0.02)
    # without the penalty the same steps do not pull it back
    model2, _ = tiny_model()
    model2.eval()
    _moved(model2, 0.05)
    plain = train_epoch(model2, batches, CrossEntropy(),
                        torch.optim.SGD(model2.parameters(), lr=0.05),
                        EpochContext(CPU, Precision(CPU, False)))
    assert plain.penalty is None
    assert sum(float((p.detach() - w0).pow(2).sum()) for p, w0 in
               zip(model2.backbone.parameters(), start, strict=True)) > 0.9 * before


@pytest.fixture(scope="module")
def l2sp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("l2sp_run")
    train(compose_train([*L2SP_RUN, "trainer.epochs=2"]), run_dir)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _scalars(run_dir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir)).Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_the_run_records_the_penalty(l2sp_run):
    run_dir, metrics = l2sp_run
    assert metrics["status"] == "completed"
    penalties = [r["train_penalty"] for r in metrics["history"]]
    assert len(penalties) == 2 and all(p > 0 for p in penalties)  # the weights left w0
    tb = _scalars(next(run_dir.rglob("events.out.tfevents.*")).parent, "train/penalty")
    assert tb == pytest.approx(penalties, rel=1e-5)
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["loop"]["l2sp_w0"] > 0


@pytest.mark.slow
def test_a_resume_keeps_the_original_w0(l2sp_run, tmp_path):
    """One epoch, then a resume to two: the same penalty as the 2-epoch run (w0 is rebuilt from
    the same start, not taken from the checkpoint's trained weights), bit for bit."""
    _, reference = l2sp_run
    run_dir = tmp_path / "run"
    train(compose_train([*L2SP_RUN, "trainer.epochs=1"]), run_dir)
    resume_run(run_dir, ["trainer.epochs=2"])
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [r["train_penalty"] for r in history] == pytest.approx(
        [r["train_penalty"] for r in reference["history"]], rel=1e-6)
    # a checkpoint whose w0 was another one is refused, in one line
    path = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["loop"]["l2sp_w0"] *= 2
    torch.save(ckpt, path)
    with pytest.raises(UserError) as exc:
        resume_run(run_dir, ["trainer.epochs=3"])
    assert "starting weights differ" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("overrides", "says"), [
    (["trainer.regularize.name=l2"], "trainer.regularize.name must be one of none, l2sp"),
    (["trainer.regularize.name=l2sp", "trainer.regularize.alpha=-1"],
     "trainer.regularize.alpha must be >= 0"),
    (["trainer.regularize.alpha=0.1"], "does not use trainer.regularize.alpha"),
    (["trainer.regularize.name=l2sp", "optimizer=adamw"], "add optimizer.weight_decay=0"),
    (["trainer.regularize.name=l2sp", "task=logreg"], "task=logreg"),
    (["experiment=ae_pretrain", "trainer.regularize.name=l2sp"], "task=autoencoder"),
])
def test_bad_values_are_one_line_errors(overrides, says):
    with pytest.raises(UserError) as exc:
        load_config(compose_config(overrides), overrides)
    assert says in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_good_values_compose():
    overrides = ["trainer.regularize.name=l2sp", "trainer.regularize.alpha=0.1",
                 "trainer.regularize.beta=0", "optimizer=adamw", "optimizer.weight_decay=0"]
    r = load_config(compose_config(overrides), overrides).trainer.regularize
    assert (r.name, r.alpha, r.beta) == ("l2sp", 0.1, 0.0)
