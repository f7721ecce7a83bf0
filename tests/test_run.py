"""End-to-end runs composed with Hydra's compose API: artifacts, metrics schema, TensorBoard."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from transferlab.infra.checkpoint import load_checkpoint
from transferlab.run import train

from .conftest import TINY

FAST = ["trainer.num_workers=0", "trainer.progress=false"]


def read_events(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_default_run_writes_every_artifact(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.epochs=2", *FAST])
    assert cfg.backbone.name == "efficientnet_lite0" and cfg.dataset.name == "digits"
    result = train(cfg, tmp_path)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    for record in metrics["history"]:
        assert set(record) >= {"epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc",
                               "lr", "seconds"}
        assert record["stage"] == "head" and record["lr"] == {"head": 1e-3}
        assert 0.0 <= record["val_acc"] <= 1.0
    best = max(metrics["history"], key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert metrics["best"] == {k: best[k] for k in ("epoch", "val_acc", "val_loss")}
    assert metrics["final"]["epoch"] == 2
    assert metrics["params"]["trainable"] == 1280 * 10 + 10  # linear head only
    assert metrics["params"]["total"] > 3_000_000
    assert metrics["wall_seconds"] > 0
    assert result.best_val_acc == metrics["best"]["val_acc"]
    # ImageNet features separate digits well even after 2 epochs of a linear probe.
    assert metrics["best"]["val_acc"] > 0.8

    png = (tmp_path / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    best_ckpt = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert last["epoch"] == 2 and last["stage"] == {"index": 0, "name": "head"}
    assert best_ckpt["epoch"] == metrics["best"]["epoch"]
    assert {"model", "optimizer", "config", "rng", "classes", "history"} <= set(last)
    assert last["config"]["backbone"]["name"] == "efficientnet_lite0"
    assert last["classes"] == [str(d) for d in range(10)]

    events = read_events(tmp_path)
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr/head", "stage"} <= tags
    assert [e.step for e in events.Scalars("val/acc")] == [1, 2]
    assert events.Scalars("val/acc")[-1].value == pytest.approx(metrics["final"]["val_acc"])
    steps_per_epoch = -(-1437 // 32)
    assert len(events.Scalars("lr/head")) == 2 * steps_per_epoch
    text_tags = set(events.Tags()["tensors"])
    assert "config/text_summary" in text_tags and "summary/head/text_summary" in text_tags
    (grid,) = events.Images("data/train_samples")  # 16 training images as the model gets them
    assert (grid.width, grid.height) == (2 + 8 * 66, 2 + 2 * 66)
    hparams = hparams_of(tmp_path)
    assert hparams["backbone"] == "efficientnet_lite0" and hparams["freeze"] == "linear_probe"


def hparams_of(run_dir) -> dict:
    """The HParams plugin's session-start record, read with TensorBoard's own event reader."""
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    out = {}
    for key, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind)
    return out


@pytest.mark.slow
def test_overrides_are_recorded_as_hparams(compose_cfg, tmp_path):
    overrides = [*TINY, "optimizer=sgd", "optimizer.lr=0.05", *FAST]
    train(compose_cfg(overrides), tmp_path, overrides=overrides)
    hp = hparams_of(tmp_path)
    assert hp["optimizer"] == "sgd" and hp["optimizer.lr"] == pytest.approx(0.05)
    assert hp["backbone.name"] == "test_efficientnet" and hp["dataset.image_size"] == 32


@pytest.mark.slow
def test_stages_switch_at_the_configured_epoch(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, "optimizer.lr=0.01", *FAST])
    cfg.freeze.merge_with({"stages": [
        {"name": "head", "epochs": 1, "train": ["head"]},
        {"name": "top", "epochs": 2, "train": ["head", {"select": "blocks[-2:]", "lr_mult": 0.1}]},
    ]})
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["stage"] for h in metrics["history"]] == ["head", "top", "top"]
    assert metrics["history"][0]["lr"] == {"head": 0.01}
    assert metrics["history"][1]["lr"] == {"head": 0.01, "blocks[-2:]": pytest.approx(0.001)}
    events = read_events(tmp_path)
    assert [e.value for e in events.Scalars("stage")] == [0, 1, 1]
    assert "summary/top/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
def test_frozen_backbone_is_unchanged_by_a_whole_run(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, "head=mlp", "trainer.epochs=2", *FAST])
    train(cfg, tmp_path)
    from transferlab.backbones import build_backbone
    from transferlab.config import load_config
    from transferlab.infra.runtime import seed_everything

    run = load_config(cfg)
    seed_everything(run.seed, False)
    initial = build_backbone(run.backbone).module.state_dict()  # same seed: same random init
    trained = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    for name, tensor in initial.items():
        assert torch.equal(trained[f"backbone.{name}"], tensor), name
    assert any(k.startswith("head.1.running_mean") for k in trained)  # the mlp head's BatchNorm


@pytest.mark.slow
def test_imbalance_options_and_label_smoothing_run_end_to_end(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, "trainer.class_weights=balanced", "trainer.sampler=balanced",
                       "trainer.label_smoothing=0.1", "dataset.samples_per_class=20",
                       "augment=trivialaugment"])
    result = train(cfg, tmp_path)
    data = result.metrics["data"]
    assert result.metrics["status"] == "completed"
    assert data["train_per_class"] == [20] * 10 and data["train"] == 200


@pytest.mark.parametrize("step", ["load_config", "build_splits", "log_training_samples",
                                  "train_epoch"])
def test_metrics_end_failed_whatever_step_fails(step, compose_cfg, tmp_path, monkeypatch,
                                                one_thread):
    """Config, build, the first logs, the loop: once metrics.json exists it never stays
    ``running``; it says ``failed`` with the error."""
    where = {"load_config": "transferlab.infra.run_dirs.load_config",
             "build_splits": "transferlab.run.build.build_splits",
             "log_training_samples": "transferlab.run.images.log_training_samples",
             "train_epoch": "transferlab.engine.stages.train_epoch"}[step]

    def broken(*args, **kwargs):
        raise RuntimeError(f"{step} broke")

    monkeypatch.setattr(where, broken)
    with pytest.raises(RuntimeError, match="broke"):
        train(compose_cfg([*TINY, *FAST]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == f"{step} broke"


def test_interrupted_run_says_so(compose_cfg, tmp_path, monkeypatch, one_thread):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transferlab.engine.stages.train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(compose_cfg([*TINY, *FAST]), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"


def test_a_nan_loss_fails_the_run_with_where_and_strict_json(compose_cfg, tmp_path, monkeypatch,
                                                            one_thread):
    from torch import nn

    from transferlab.errors import UserError

    class Diverged(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.calls = 0

        def forward(self, logits, y):
            self.calls += 1
            loss = nn.functional.cross_entropy(logits, y)
            return loss * float("nan") if self.calls == 3 else loss

    monkeypatch.setattr("transferlab.run.build.nn.CrossEntropyLoss", Diverged)
    with pytest.raises(UserError, match=r"^loss is nan at epoch 1 step 3: the run diverged"):
        train(compose_cfg([*TINY, *FAST]), tmp_path)
    text = (tmp_path / "metrics.json").read_text()

    def no_constants(name):
        raise AssertionError(f"metrics.json holds {name}: not JSON")

    metrics = json.loads(text, parse_constant=no_constants)
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("loss is nan at epoch 1 step 3")


def test_non_finite_numbers_are_written_as_null(tmp_path):
    from transferlab.run.record import RunTracker

    tracker = RunTracker(tmp_path, {}, {"seed": 0})
    tracker.log_epoch({"epoch": 1, "stage": "s", "train_loss": float("inf"), "train_acc": 0.5,
                       "val_loss": float("nan"), "val_acc": 0.5, "lr": {}, "seconds": 1.0}, 0)
    tracker.finish("completed")
    metrics = json.loads((tmp_path / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert metrics["history"][0]["train_loss"] is None and metrics["final"]["val_loss"] is None


def test_the_record_keeps_the_runtime_and_a_resume_under_another_says_so(tmp_path, caplog):
    from transferlab.run.record import RunTracker

    tracker = RunTracker(tmp_path, {}, {"seed": 0})
    tracker.log_epoch({"epoch": 1, "stage": "s", "train_loss": 1.0, "train_acc": 0.5,
                       "val_loss": 1.0, "val_acc": 0.5, "lr": {}, "seconds": 1.0}, 0)
    tracker.finish("interrupted")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    runtime = dict(metrics["runtime"])
    assert runtime["threads"] == torch.get_num_threads()
    assert runtime["torch"] == importlib.metadata.version("torch")
    resume = {"epoch": 1, "step": 0, "history": metrics["history"], "best": metrics["best"]}
    RunTracker(tmp_path, {}, {"seed": 0}, resume=resume).finish("interrupted")  # the same one
    assert "runtime_changed" not in json.loads((tmp_path / "metrics.json").read_text())[
        "resumes"][-1] and "another runtime" not in caplog.text
    metrics["runtime"]["threads"] = runtime["threads"] + 3  # as if started with other threads
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with caplog.at_level("WARNING", logger="transferlab"):
        RunTracker(tmp_path, {}, {"seed": 0}, resume=resume).finish("interrupted")
    changed = f"threads {runtime['threads'] + 3} -> {runtime['threads']}"
    assert f"resuming with another runtime ({changed})" in caplog.text
    after = json.loads((tmp_path / "metrics.json").read_text())
    assert after["resumes"][-1]["runtime_changed"] == [changed] and after["runtime"] == runtime


@pytest.mark.slow  # (a whole run)
def test_a_stop_asked_after_the_last_epochs_look_completes_the_run_and_is_kept(
        compose_cfg, tmp_path, monkeypatch):
    """Ctrl-C after the fit's last look at it (its end-of-run work): the run completes, and
    the stop is kept, once, for the sweep that runs it (it stops before its next job)."""
    import os
    import signal

    from transferlab.engine import stages
    from transferlab.run.hooks import StopRequest

    fit = stages.fit_stages

    def fit_then_ctrl_c(loop):
        fit(loop)
        os.kill(os.getpid(), signal.SIGINT)  # caught by the run's StopRequest
        return loop

    monkeypatch.setattr(stages, "fit_stages", fit_then_ctrl_c)
    result = train(compose_cfg(TINY), tmp_path / "run")
    assert result.metrics["status"] == "completed"
    assert StopRequest.take_late() == signal.SIGINT and StopRequest.take_late() is None


def _epoch(tracker):
    tracker.log_epoch({"epoch": 1, "stage": "s", "train_loss": 1.0, "train_acc": 0.5,
                       "val_loss": 1.0, "val_acc": 0.5, "lr": {}, "seconds": 1.0}, 0)


def _import_hit_by_ctrl_c():
    """What a second Ctrl-C that lands while pybind11 imports a module reaches Python as."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as stop:
        raise ImportError("initialization failed") from stop


def test_a_ctrl_c_that_lands_in_an_import_ends_the_run_interrupted_not_failed(tmp_path):
    """(CI once saw ``error: job 1 failed: initialization failed`` after two Ctrl-C.)"""
    from transferlab.run.record import RunTracker

    tracker = RunTracker(tmp_path, {}, {"seed": 0})
    with pytest.raises(KeyboardInterrupt), tracker.recording():
        _epoch(tracker)
        _import_hit_by_ctrl_c()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["status"], metrics["error"]) == ("interrupted", "KeyboardInterrupt")


def test_a_ctrl_c_while_the_curves_are_drawn_still_ends_the_record(tmp_path, monkeypatch):
    """The first Ctrl-C ended the fit (Interrupted); the second lands in matplotlib's import
    as the curves are drawn: the record still says ``interrupted`` with the first signal, and
    the stop goes on as a KeyboardInterrupt."""
    from transferlab.errors import Interrupted
    from transferlab.run import plots
    from transferlab.run.record import RunTracker

    monkeypatch.setattr(plots, "save_learning_curves", lambda *a: _import_hit_by_ctrl_c())
    tracker = RunTracker(tmp_path, {}, {"seed": 0})
    with pytest.raises(KeyboardInterrupt), tracker.recording("curves"):
        _epoch(tracker)
        raise Interrupted(2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["status"], metrics["error"]) == ("interrupted", "signal 2")


def test_an_error_is_a_stop_only_when_a_stop_is_behind_it():
    from transferlab.errors import Interrupted, stop_behind, stops_unwrapped

    with pytest.raises(ImportError) as plain:
        raise ImportError("initialization failed")
    assert stop_behind(plain.value) is None
    with pytest.raises(KeyboardInterrupt), stops_unwrapped():
        _import_hit_by_ctrl_c()
    with pytest.raises(Interrupted), stops_unwrapped():
        try:
            raise Interrupted(15)
        except Interrupted:
            raise OSError("a write cut short") from None  # (its context: the stop)
    with pytest.raises(ValueError), stops_unwrapped():
        raise ValueError("a bug")
