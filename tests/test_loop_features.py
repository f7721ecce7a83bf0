"""Early stopping per stage, gradient accumulation and gradient clipping (issue #14)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from transferlab.config import compose_config, load_config
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.engine.stepping import StepCalls, StepOptions
from transferlab.errors import UserError
from transferlab.infra.runtime import Precision
from transferlab.run import resume_run, train
from transferlab.run.hooks import CachedInputs

from .conftest import TINY, compose_train

CPU = torch.device("cpu")


# --- gradient accumulation and clipping: one epoch of a small MLP, plain SGD ------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # no BN, no dropout


def _data(n: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g) * scale, torch.randint(0, 3, (n,), generator=g)


def _batches(x, y, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append((x[start:start + size], y[start:start + size]))
        start += size
    assert start == len(x)
    return out


def _epoch(sizes: list[int], stepping: StepOptions, lr: float = 0.5, data=None,
           model: nn.Module | None = None, precision: Precision | None = None, grad_norm=None):
    """Weights after one epoch over batches of ``sizes`` and the optimizer steps taken."""
    x, y = data if data is not None else _data(sum(sizes))
    model = model or _mlp()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = []
    train_epoch(model, _batches(x, y, sizes), CrossEntropy(), optimizer,
                EpochContext(CPU, precision or Precision(CPU, False)),
                hooks=StepCalls(before=lambda opt: steps.append(1), grad_norm=grad_norm),
                stepping=stepping)
    return [p.detach().clone() for p in model.parameters()], len(steps)


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-6) -> None:
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=tol)


@pytest.mark.parametrize(("sizes", "k", "one_batch"), [
    ([4, 4, 4], 3, [12]),  # k batches of b = one batch of k*b
    ([4, 4, 2], 3, [10]),  # a short last group: its own samples' mean
    ([4, 4, 4, 4, 2], 2, [8, 8, 2]),  # steps every 2 batches, then one for the remainder
])
def test_accumulation_equals_one_larger_batch(sizes, k, one_batch):
    accumulated, steps = _epoch(sizes, StepOptions(accumulate=k))
    plain, plain_steps = _epoch(one_batch, StepOptions())
    assert steps == plain_steps == len(one_batch)  # the schedule's steps: optimizer steps
    _close(accumulated, plain)
    # and it is not what stepping every batch gives
    every, _ = _epoch(sizes, StepOptions())
    assert max((a - b).abs().max() for a, b in zip(every, plain, strict=True)) > 1e-3


def _grads(model: nn.Module, data) -> list[torch.Tensor]:
    x, y = data
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_clip_by_norm_caps_the_total_norm_of_the_trainable_grads():
    data = _data(16, scale=50.0)  # large inputs: a grad norm far above the limit
    model = _mlp()
    model[0].bias.requires_grad_(False)  # frozen: neither clipped nor stepped
    before = [p.detach().clone() for p in model.parameters()]
    grads = _grads(model, data)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 1.0
    seen = []
    after, _ = _epoch([16], StepOptions(clip_val=0.25, clip_algorithm="norm"), lr=1.0,
                      data=data, model=model, grad_norm=seen.append)
    trainable = [i for i, p in enumerate(model.parameters()) if p.requires_grad]
    deltas = [before[i] - after[i] for i in trainable]  # lr 1: the clipped grads
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas]))
    assert total == pytest.approx(0.25, rel=1e-4)
    _close(deltas, [g * (0.25 / norm) for g in grads], tol=1e-5)
    assert torch.equal(after[1], before[1])  # the frozen bias
    assert [float(n) for n in seen] == pytest.approx([float(norm)], rel=1e-4)  # pre-clip


def _scaled() -> Precision:
    """fp16 mixed precision's loss scaling (on the CPU: the scaler alone, a large scale)."""
    precision = Precision(CPU, False)
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    return precision


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_and_accumulation_act_on_unscaled_grads(algorithm):
    """Under a GradScaler the grads are unscaled before clipping: the same step as without."""
    data = _data(16, scale=50.0)
    options = StepOptions(accumulate=2, clip_val=0.05, clip_algorithm=algorithm)
    plain, _ = _epoch([4, 4, 4, 4], options, lr=1.0, data=data)
    scaled, _ = _epoch([4, 4, 4, 4], options, lr=1.0, data=data, precision=_scaled())
    _close(scaled, plain, tol=1e-5)


def test_clip_by_value_clamps_every_grad():
    data = _data(16, scale=50.0)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    grads = _grads(model, data)
    assert max(float(g.abs().max()) for g in grads) > 0.01
    after, _ = _epoch([16], StepOptions(clip_val=0.01, clip_algorithm="value"), lr=1.0,
                      data=data, model=model)
    deltas = [b - a for b, a in zip(before, after, strict=True)]
    _close(deltas, [g.clamp(-0.01, 0.01) for g in grads])


def test_accumulation_stops_an_epoch_only_after_an_optimizer_step():
    """A stop asked for mid-group waits for the group's step (a resume then skips whole
    groups: no half-accumulated gradients are lost)."""
    x, y = _data(20)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_epoch(model, _batches(x, y, [4] * 5), CrossEntropy(), optimizer,
                        EpochContext(CPU, Precision(CPU, False)),
                        hooks=StepCalls(stop=lambda: True), stepping=StepOptions(accumulate=3))
    assert stats.stopped and stats.steps == 3


# --- config checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "says"), [
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be >= 1"),
    (["trainer.gradient_clip_val=0"], "trainer.gradient_clip_val must be > 0"),
    (["trainer.gradient_clip_val=1", "trainer.gradient_clip_algorithm=l2"],
     "trainer.gradient_clip_algorithm must be one of norm, value"),
    (["trainer.gradient_clip_algorithm=value"], "does not use trainer.gradient_clip_algorithm"),
    (["trainer.early_stopping.monitor=val_acc"], "does not use trainer.early_stopping.monitor"),
    (["trainer.early_stopping.restore_best=false"],
     "does not use trainer.early_stopping.restore_best"),
    (["trainer.early_stopping.patience=0"], "trainer.early_stopping.patience must be >= 1"),
    (["trainer.early_stopping.patience=2", "trainer.early_stopping.monitor=acc"],
     "trainer.early_stopping.monitor must be one of val_loss, val_acc"),
    (["trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=-1"],
     "trainer.early_stopping.min_delta must be >= 0"),
    (["experiment=ae_pretrain", "trainer.early_stopping.patience=2",
      "trainer.early_stopping.monitor=val_acc"], "task=autoencoder has no accuracy"),
    (["task=logreg", "trainer.accumulate_grad_batches=2"],
     "does not use trainer.accumulate_grad_batches"),
])
def test_bad_values_are_one_line_errors(overrides, says):
    with pytest.raises(UserError, match=None) as exc:
        load_config(compose_config(overrides), overrides)
    assert says in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_good_values_compose():
    overrides = ["trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=1.5",
                 "trainer.gradient_clip_algorithm=value", "trainer.early_stopping.patience=3",
                 "trainer.early_stopping.monitor=val_acc", "trainer.early_stopping.min_delta=0.01"]
    run = load_config(compose_config(overrides), overrides)
    t = run.trainer
    assert (t.accumulate_grad_batches, t.gradient_clip_val, t.gradient_clip_algorithm) == \
        (4, 1.5, "value")
    assert (t.early_stopping.patience, t.early_stopping.monitor) == (3, "val_acc")
    defaults = load_config(compose_config([]), [])
    assert defaults.trainer.early_stopping.patience is None  # off by default
    assert defaults.trainer.accumulate_grad_batches == 1
    assert defaults.trainer.gradient_clip_val is None


# --- one tie rule: early stopping's restored epoch and best.pt ---------------------------------

class _Tracker:
    def __init__(self):
        self.extra, self.texts = {}, []

    def log_text(self, tag, text, step):
        self.texts.append(text)


def _stopping(monitor: str, min_delta: float = 0.0):
    from types import SimpleNamespace

    from transferlab.config.schema import EarlyStoppingConfig
    from transferlab.engine.early_stopping import EarlyStopping

    stopping = EarlyStopping(EarlyStoppingConfig(patience=2, monitor=monitor,
                                                 min_delta=min_delta), _Tracker())
    stopping.begin(SimpleNamespace(name="head", index=0, first_epoch=1, last_epoch=9))
    return stopping


@pytest.mark.parametrize("monitor", ["val_acc", "val_loss"])
def test_early_stopping_restores_the_epoch_best_pt_holds_on_a_tie(monitor):
    """Epoch 2 has epoch 1's accuracy at a lower loss: the run's best (best.pt) is epoch 2, and
    so is the epoch early stopping restores; epoch 2 resets no patience under val_acc (it did
    not improve the monitored value), and a later exact tie in both stays with the earlier."""
    from transferlab.engine.best import epoch_rank

    records = [{"epoch": 1, "val_acc": 0.9, "val_loss": 0.5},
               {"epoch": 2, "val_acc": 0.9, "val_loss": 0.3},
               {"epoch": 3, "val_acc": 0.9, "val_loss": 0.3},
               {"epoch": 4, "val_acc": 0.8, "val_loss": 0.9}]
    model = nn.Linear(2, 2)
    stopping = _stopping(monitor)
    for record in records:
        with torch.no_grad():
            model.weight.fill_(record["epoch"])
        if stopping.update(record, model):
            break
    run_best = max(records, key=epoch_rank)  # the record's rule (the first of equals)
    assert run_best["epoch"] == stopping.best_epoch == 2
    assert stopping.best_state["weight"].eq(2).all()
    assert stopping.epoch == (3 if monitor == "val_acc" else 4)  # patience 2 from its reference
    stopping.end(model, None)
    assert model.weight.eq(2).all() and "the weights of epoch 2 restored" in \
        stopping.tracker.texts[0]
    assert stopping.tracker.extra["stopped_early"][0]["best_epoch"] == 2


def test_an_improvement_below_min_delta_is_not_the_best_epoch():
    """min_delta decides what counts as better; the tie rule applies to equal values only."""
    stopping = _stopping("val_acc", min_delta=0.05)
    model = nn.Linear(2, 2)
    for record in ({"epoch": 1, "val_acc": 0.90, "val_loss": 0.5},
                   {"epoch": 2, "val_acc": 0.92, "val_loss": 0.2}):
        stopping.update(record, model)
    assert stopping.best_epoch == 1 and stopping.wait == 1


# --- early stopping in a run --------------------------------------------------------------------

# two_stage on 100 digits: the head stage (5 planned epochs, on cached features) stops after
# epoch 3: min_delta is so large that nothing after its first epoch counts as an improvement.
# 100 images in batches of 32 (4 batches), 3 a step: 2 optimizer steps an epoch.
EARLY = [*(o for o in TINY if not o.startswith("trainer.epochs=")),
         "dataset.samples_per_class=10", "dataset.val_fraction=0.05", "augment=none",
         "freeze=two_stage", "freeze.head_epochs=5", "freeze.finetune_epochs=1",
         "freeze.fine_tune_at=-1", "trainer.deterministic=true", "trainer.keep_checkpoints=all",
         "trainer.feature_cache.mode=memory", "trainer.early_stopping.patience=2",
         "trainer.early_stopping.min_delta=1e9", "trainer.accumulate_grad_batches=3",
         "trainer.gradient_clip_val=1.0"]


@pytest.fixture
def stage_starts(monkeypatch):
    """The whole model's weights as each stage starts (after any restore), by stage name."""
    seen: dict[str, dict] = {}
    original = CachedInputs.setup_stage

    def spy(self, loop):
        seen[loop.plan.name] = {k: v.clone() for k, v in loop.model.state_dict().items()}
        return original(self, loop)

    monkeypatch.setattr(CachedInputs, "setup_stage", spy)
    return seen


def _model(run_dir, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_a_stage_stops_early_and_the_next_starts_from_its_best_weights(tmp_path, stage_starts,
                                                                        one_thread):
    run_dir = tmp_path / "run"
    result = train(compose_train(EARLY), run_dir, EARLY)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(r["epoch"], r["stage"]) for r in metrics["history"]] == \
        [(1, "head"), (2, "head"), (3, "head"), (6, "finetune")]  # planned numbers: a gap
    assert metrics["stopped_early"] == [{
        "stage": "head", "stage_index": 0, "epoch": 3, "planned_last_epoch": 5,
        "monitor": "val_loss", "best": metrics["history"][0]["val_loss"], "best_epoch": 1,
        "patience": 2, "min_delta": 1e9, "restored": True}]
    # the head stage really trained on cached features (a remainder sharing the parameters)
    assert metrics["feature_cache"]["head"]["splits"]["train"] in ("extracted", "memory")
    # the finetune stage started from epoch 1's weights, not from epoch 3's
    epoch1, epoch3 = _model(run_dir, "epoch_1.pt"), _model(run_dir, "epoch_3.pt")
    assert not _same(epoch1, epoch3)
    assert _same(stage_starts["finetune"], epoch1)
    # the counters in the checkpoints; the best weights where they are not the checkpoint's own
    loops = {e: torch.load(run_dir / "checkpoints" / f"epoch_{e}.pt", weights_only=True)["loop"]
             for e in (1, 2, 3)}
    assert [(loops[e]["early_stopping"]["wait"], loops[e]["early_stopping"]["stopped"])
            for e in (1, 2, 3)] == [(0, False), (1, False), (2, True)]
    assert "best_model" not in loops[1]["early_stopping"]
    assert _same(loops[3]["early_stopping"]["best_model"], epoch1)
    # optimizer steps: 2 an epoch (4 batches, 3 a step), the schedule and the LR log per step
    assert [loops[e]["step"] for e in (1, 2, 3)] == [2, 4, 6]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["loop"]["step"] \
        == 8
    # best / final: the run's as always
    assert metrics["final"]["epoch"] == 6
    assert (run_dir / "learning_curves.png").is_file()
    assert result.metrics["status"] == "completed"
    # the pre-clip grad norm in TensorBoard, one point per optimizer step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert [e.step for e in events.Scalars("grad/norm")] == list(range(1, 9))
    assert "early_stopping/head/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
@pytest.mark.parametrize("from_epoch", [1, 2, 3])
def test_a_resume_stops_and_restores_as_the_run_did(tmp_path, from_epoch, stage_starts,
                                                    one_thread):
    """From epoch 1 (the best: its weights are the checkpoint's own), epoch 2 (one epoch
    without improvement, the best weights kept in the checkpoint) and epoch 3 (stopped, not yet
    restored): the same record and weights as without the interruption."""
    whole = tmp_path / "whole"
    train(compose_train(EARLY), whole, EARLY)
    expected = json.loads((whole / "metrics.json").read_text())
    finetune_start = stage_starts.pop("finetune")
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    ckpt = cut / "checkpoints"
    for path in ckpt.glob("epoch_*.pt"):
        if int(path.stem.split("_")[1]) > from_epoch:
            path.unlink()
    shutil.copyfile(ckpt / f"epoch_{from_epoch}.pt", ckpt / "last.pt")
    metrics = json.loads((cut / "metrics.json").read_text())
    metrics["status"] = "interrupted"
    (cut / "metrics.json").write_text(json.dumps(metrics))
    resume_run(cut)
    resumed = json.loads((cut / "metrics.json").read_text())
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed["history"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in expected["history"]]
    assert resumed["stopped_early"] == expected["stopped_early"]
    assert _same(stage_starts["finetune"], finetune_start)
    assert _same(_model(cut, "last.pt"), _model(whole, "last.pt"))
