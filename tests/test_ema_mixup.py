"""The EMA of the weights (``trainer.ema``) and MixUp / CutMix (``augment.mixup_alpha`` ...)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferlab.cli.evaluate import main as eval_main
from transferlab.cli.predict import main as predict_main
from transferlab.config import EmaConfig, load_config
from transferlab.config.schema import AugmentConfig
from transferlab.data import SeededBatch
from transferlab.data.mixup import MixCollate, batch_mixer
from transferlab.engine.context import EpochContext
from transferlab.engine.ema import WeightsEma
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.engine.stepping import StepCalls
from transferlab.errors import UserError
from transferlab.infra.runtime import Precision
from transferlab.run import resume_run, train
from transferlab.tools.evaluate import EVAL_JSON

from .conftest import TINY, TINY_CLASSES, TINY_SIZE, compose_train, tiny_model

CPU = torch.device("cpu")
SMALL = [*TINY, "dataset.samples_per_class=12"]  # 120 training images: 4 steps an epoch
EMA = [*SMALL, "trainer.ema.decay=0.8"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


# --- EMA mechanics ------------------------------------------------------------------------------


def test_ema_after_two_steps_is_the_hand_computed_average():
    """ema0 = w0, then ema = d * ema + (1 - d) * w after each optimizer step, for every parameter
    and BatchNorm statistic; the averaged weights differ from the raw ones."""
    torch.manual_seed(0)
    model, _ = tiny_model()
    model.train()
    d = 0.7
    ema = WeightsEma(EmaConfig(decay=d), model)
    seen = [_float_state(model)]  # w0, w1, w2

    def after_step(_loss):
        seen.append(_float_state(model))
        ema.update()

    data = TensorDataset(torch.randn(8, 3, TINY_SIZE, TINY_SIZE),
                         torch.randint(0, TINY_CLASSES, (8,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_epoch(model, DataLoader(data, batch_size=4), CrossEntropy(), optimizer,
                EpochContext(CPU, Precision(CPU, False)), hooks=StepCalls(after=after_step))

    assert len(seen) == 3 and ema.updates == 2
    averaged = ema.module.state_dict()
    differs = 0
    for name, w0 in seen[0].items():
        expected = d * (d * w0 + (1 - d) * seen[1][name]) + (1 - d) * seen[2][name]
        torch.testing.assert_close(averaged[name], expected, rtol=1e-5, atol=1e-6)
        differs += not torch.equal(averaged[name], seen[2][name])
    assert differs > 10  # the head, the trained convolutions, the BatchNorm statistics


def test_a_stage_start_gives_the_fixed_part_the_models_values():
    """A part an earlier stage trained and this one freezes (or keeps in eval mode) takes the
    model's values at the stage start; a part that trains keeps its average."""
    model, _ = tiny_model()
    ema = WeightsEma(EmaConfig(decay=0.9), model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            b.add_(1)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.train()
    model.backbone.bn1.eval()
    ema.start_stage()

    got = ema.module.state_dict()
    for name, value in model.state_dict().items():
        fixed = name.startswith("backbone.") and (
            "running" not in name and "num_batches" not in name or name.startswith("backbone.bn1"))
        assert torch.equal(got[name], value) == fixed, name


# --- a run with EMA ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A 2-epoch run with the EMA on (linear probe: the head trains on cached features)."""
    run_dir = tmp_path_factory.mktemp("ema_run")
    train(compose_train([*EMA, "trainer.epochs=2"]), run_dir)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_the_run_records_the_ema_next_to_the_raw_weights(ema_run):
    run_dir, metrics = ema_run
    assert metrics["feature_cache"]["head"]["cut"]  # the EMA was evaluated on cached features
    for record in metrics["history"]:
        assert 0 <= record["val_acc_ema"] <= 1 and record["val_loss_ema"] > 0
    assert metrics["history"][-1]["val_loss_ema"] != metrics["history"][-1]["val_loss"]
    best = max(metrics["history"], key=lambda r: (r["val_acc_ema"], -r["val_loss_ema"]))
    assert metrics["best_ema"] == {k: best[k] for k in ("epoch", "val_acc_ema", "val_loss_ema")}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run_dir / "tb")).Reload().Tags()["scalars"]
    assert {"val/acc_ema", "val/loss_ema", "val/acc", "val/loss"} <= set(tags)


@pytest.mark.slow  # (its run fixture: the fast tier stays under a minute)
def test_the_checkpoint_holds_the_ema_and_the_frozen_part_equals_the_model(ema_run):
    run_dir, _ = ema_run
    for name in ("last", "best", "best_ema"):
        ckpt = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        raw, avg = ckpt["model"], ckpt["ema"]["model"]
        assert ckpt["ema"]["updates"] == 4 * ckpt["epoch"] and ckpt["ema"]["decay"] == 0.8
        assert raw.keys() == avg.keys()
        for key in raw:  # the frozen backbone's average is the backbone itself
            assert torch.equal(raw[key], avg[key]) == key.startswith("backbone."), key


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint, entry", [("best_ema", "best_ema"), ("last", "final")])
def test_eval_with_weights_ema_reproduces_the_recorded_val_acc_ema(ema_run, checkpoint, entry):
    run_dir, metrics = ema_run
    recorded = metrics[entry] if entry == "best_ema" else metrics["history"][-1]
    assert eval_main([f"run={run_dir}", f"checkpoint={checkpoint}", "weights=ema"]) == 0
    report = json.loads((run_dir / EVAL_JSON).read_text())
    assert report["weights"] == "ema" and report["epoch"] == recorded["epoch"]
    assert report["accuracy"] == pytest.approx(recorded["val_acc_ema"], abs=1e-6)
    assert report["loss"] == pytest.approx(recorded["val_loss_ema"], abs=2e-3)  # fp16 cache
    assert eval_main([f"run={run_dir}", f"checkpoint={checkpoint}"]) == 0  # raw: the default
    raw = json.loads((run_dir / EVAL_JSON).read_text())
    assert raw["weights"] == "raw" and raw["loss"] != pytest.approx(report["loss"], abs=1e-6)


@pytest.mark.slow  # (its run fixture: the fast tier stays under a minute)
def test_weights_ema_without_an_ema_is_one_line_exit_2(ema_run, tmp_path, capsys):
    run_dir, _ = ema_run
    plain = tmp_path / "plain"
    shutil.copytree(run_dir, plain)
    ckpt = torch.load(plain / "checkpoints" / "best.pt", weights_only=True)
    del ckpt["ema"]
    torch.save(ckpt, plain / "checkpoints" / "best.pt")
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    capsys.readouterr()
    assert eval_main([f"run={plain}", "weights=ema"]) == 2
    assert predict_main([f"run={plain}", "weights=ema", str(image)]) == 2
    for line in capsys.readouterr().err.strip().splitlines():
        assert line.startswith("error: weights=ema:") and "trainer.ema.decay" in line
    out = tmp_path / "p.csv"
    assert predict_main([f"run={run_dir}", "weights=ema", f"output={out}", str(image)]) == 0
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.slow
def test_resume_restores_the_ema(ema_run, tmp_path):
    """One epoch, then a resume to two: the same average as the 2-epoch run, bit for bit."""
    ref_dir, reference = ema_run
    run_dir = tmp_path / "run"
    train(compose_train([*EMA, "trainer.epochs=1"]), run_dir)
    resume_run(run_dir, ["trainer.epochs=2"])
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["ema"]
    ref = torch.load(ref_dir / "checkpoints" / "last.pt", weights_only=True)["ema"]
    assert got["updates"] == ref["updates"] == 8
    for key, value in ref["model"].items():
        assert torch.equal(got["model"][key], value), key
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [r["val_acc_ema"] for r in history] == [r["val_acc_ema"]
                                                   for r in reference["history"]]


# --- MixUp / CutMix -----------------------------------------------------------------------------


def _batch(n: int = 8, epoch: int = 1) -> SeededBatch:
    g = torch.Generator().manual_seed(0)
    samples = [(torch.rand(3, 16, 16, generator=g), i % 4) for i in range(n)]
    return SeededBatch(samples, epoch, list(range(100, 100 + n)))


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_give_soft_targets_and_a_finite_loss(mixup, cutmix):
    collate = MixCollate(AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), 4, seed=0)
    batch = _batch()
    x, y = collate(batch)
    plain = torch.stack([s[0] for s in batch])
    assert x.shape == plain.shape and not torch.equal(x, plain)
    assert y.shape == (8, 4) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    assert ((y > 0) & (y < 1)).any()  # mixed, not one-hot
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(8, 4), y)
    assert torch.isfinite(loss)
    again = collate(_batch())  # seeded by (seed, epoch, indices): the same draw
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    other = collate(_batch(epoch=2))
    assert not torch.equal(other[1], y)


def test_mix_prob_zero_or_alphas_zero_mean_no_mixing():
    assert batch_mixer(AugmentConfig(), 4, 0) is None
    assert batch_mixer(AugmentConfig(mixup_alpha=0.2, mix_prob=0.0), 4, 0) is None


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mix_run")
    train(compose_train([*SMALL, "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0",
                         "trainer.label_smoothing=0.1"]), run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow  # (its run fixture: the fast tier stays under a minute)
def test_with_mixing_the_feature_cache_is_not_used_and_says_why(mix_run):
    report = mix_run["feature_cache"]["head"]
    assert report["cut"] is None
    assert report["reason"].startswith("not cached: augment.mixup_alpha=0.2 and "
                                       "augment.cutmix_alpha=1 mix the training images")
    record = mix_run["history"][0]
    assert record["train_loss"] > 0 and 0 <= record["train_acc"] <= 1
    assert "larger weight" in mix_run["mix"]["train_acc"]


@pytest.mark.parametrize("override, says", [
    ("trainer.ema.decay=1.0", "trainer.ema.decay must be in (0, 1)"),
    ("augment.mix_prob=1.5", "augment.mix_prob must be in [0, 1]"),
    ("augment.mixup_alpha=-1", "augment.mixup_alpha must be >= 0"),
])
def test_bad_values_are_one_line_errors(override, says):
    with pytest.raises(UserError, match=re.escape(says)):
        load_config(compose_train([*TINY, override]))


def test_mixing_does_not_go_with_the_autoencoder():
    with pytest.raises(UserError, match="task=autoencoder has none"):
        load_config(compose_train(["experiment=ae_pretrain", "augment.mixup_alpha=0.2"]))


@pytest.mark.slow  # (its run fixture: the fast tier stays under a minute)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated
def test_export_weights_ema_exports_the_average(ema_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from transferlab.cli.export import main as export_main

    run_dir, _ = ema_run
    out = tmp_path / "deploy"
    assert export_main([f"run={run_dir}", "checkpoint=last", "weights=ema", "format=torchscript",
                        f"output={out}", "samples=4"]) == 0
    assert json.loads((out / "preprocessing.json").read_text())["run"]["weights"] == "ema"
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    exported = {k: v for k, v in torch.jit.load(str(out / "model.ts")).state_dict().items()}
    head = [k for k in ckpt["ema"]["model"] if k.startswith("head.") and k.endswith("weight")]
    assert head
    for key in head:  # the exported head is the EMA's, not the raw one
        assert torch.equal(exported[key], ckpt["ema"]["model"][key])
        assert not torch.equal(exported[key], ckpt["model"][key])


@pytest.mark.slow  # (its run fixture: the fast tier stays under a minute)
def test_the_learning_curves_draw_the_ema_weights_val_curve(ema_run):
    from transferlab.run.plots import learning_curves

    _, metrics = ema_run
    fig = learning_curves(metrics["history"])
    acc, loss = fig.axes
    labels = [line.get_label() for line in acc.get_lines()]
    assert "val accuracy (EMA weights)" in labels
    line = acc.get_lines()[labels.index("val accuracy (EMA weights)")]
    assert list(line.get_ydata()) == [r["val_acc_ema"] for r in metrics["history"]]
    assert "val loss (EMA weights)" in [line.get_label() for line in loss.get_lines()]
    plain = learning_curves([{k: v for k, v in r.items() if not k.endswith("_ema")}
                             for r in metrics["history"]])
    assert not any("EMA" in line.get_label() for line in plain.axes[0].get_lines())
