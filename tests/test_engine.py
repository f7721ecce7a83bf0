"""The one staged engine: hooks in order, the freeze ledger, the LR finder's warm-up on the
same engine, and every staged policy extended on resume by its own registry entry."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY, compose_train, tiny_model
from transferlab.config import load_config
from transferlab.config.schema import FreezeConfig, SelectorSpec, StageSpec
from transferlab.engine.hooks import Hook
from transferlab.engine.ledger import FreezeLedgerError, fingerprint, optimizer_mismatch, promised
from transferlab.errors import UserError
from transferlab.run import resume_run, train
from transferlab.run.resume import resumed_config
from transferlab.run.tasks import Classify
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages, set_train_mode
from transferlab.tools.lr_find import prepare_stage

FAST = ["trainer.num_workers=0", "trainer.progress=false", "trainer.device=cpu"]
SMALL = [o for o in TINY if not o.startswith("trainer.epochs")] + [
    *FAST, "dataset.samples_per_class=8", "trainer.batch_size=16"]


# --- the ledger's pieces (fast) ---------------------------------------------------------------


def _plan(model, backbone, train, bn="frozen"):
    policy = FreezeConfig(name="custom", stages=[
        StageSpec(name="s", epochs=1, train=[SelectorSpec(t) for t in train], bn=bn)])
    (plan,) = plan_stages(model, backbone, policy, 0.1)
    return plan


def test_the_ledger_promises_frozen_tensors_and_eval_batchnorm_statistics():
    model, backbone = tiny_model()
    plan = _plan(model, backbone, ["head"])
    kept = promised(model, plan)
    params = {n for n, _ in model.named_parameters()}
    assert {n for n in kept if n in params} == {n for n in params if not n.startswith("head.")}
    stats = [n for n in kept if n not in params]
    assert stats and all(n.endswith(("running_mean", "running_var", "num_batches_tracked"))
                         for n in stats)
    # bn=train: the statistics may move, only the frozen parameters are promised
    assert all(n in params for n in promised(model, _plan(model, backbone, ["head"], "train")))


def test_a_fingerprint_sees_one_changed_bit_in_any_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        t = torch.arange(12, dtype=dtype).reshape(3, 4)
        before = fingerprint(t)
        assert fingerprint(t.clone()) == before
        t.view(-1)[5] += 1
        assert fingerprint(t) != before
    assert fingerprint(torch.tensor(3)) != fingerprint(torch.tensor([3]))  # shape counts


def test_the_optimizer_must_hold_exactly_the_planned_parameters_at_their_lrs():
    model, backbone = tiny_model()
    plan = _plan(model, backbone, ["head", "blocks[-1]"])
    apply_stage(model, plan)
    cfg = load_config(compose_train(SMALL)).optimizer
    optimizer = stage_optimizer(model, plan, cfg, None)
    assert optimizer_mismatch(model, plan, optimizer) is None
    optimizer.param_groups[0]["initial_lr"] *= 2
    assert "trains at lr" in optimizer_mismatch(model, plan, optimizer)
    optimizer = stage_optimizer(model, plan, cfg, None)
    frozen = next(n for n, p in model.named_parameters() if not p.requires_grad)
    model.get_parameter(frozen).requires_grad_(True)
    assert optimizer_mismatch(model, plan, optimizer) == \
        f"{frozen} requires grad, but the stage does not train it"


# --- the ledger in a run ----------------------------------------------------------------------


class _Vandal(Hook):
    """Writes into a tensor that the stage froze, after its first epoch."""

    def __init__(self, name: str):
        self.name = name

    def on_epoch_end(self, loop) -> None:
        with torch.no_grad():
            loop.model.state_dict()[self.name].add_(1)


@pytest.mark.slow
def test_a_normal_run_records_that_its_ledger_held(tmp_path, one_thread):
    overrides = [*SMALL, "freeze=two_stage", "freeze.head_epochs=1", "freeze.finetune_epochs=1"]
    result = train(compose_train(overrides), tmp_path, overrides)
    ledger = result.metrics["ledger"]
    assert list(ledger) == ["head", "finetune"]
    assert all(entry["held"] and entry["checks"] == ["end"] for entry in ledger.values())
    model = result.built.model
    frozen_head_stage = sum(1 for n, _ in model.named_parameters() if not n.startswith("head."))
    assert ledger["head"]["tensors"] == frozen_head_stage and ledger["head"]["statistics"] > 0
    assert ledger["finetune"]["tensors"] < frozen_head_stage  # the finetune stage trains more
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["ledger"] == ledger


@pytest.mark.parametrize("target, kind", [
    ("backbone.conv_stem.weight", "tensor"),
    ("backbone.bn1.running_mean", "BatchNorm statistic"),
])
def test_a_hook_that_writes_a_frozen_tensor_fails_the_run_naming_it(target, kind, tmp_path,
                                                                     monkeypatch, one_thread):
    monkeypatch.setattr(Classify, "hooks", lambda self, built, tracker: [_Vandal(target)])
    overrides = [*SMALL, "trainer.epochs=2"]
    with pytest.raises(FreezeLedgerError) as raised:
        train(compose_train(overrides), tmp_path, overrides)
    line = str(raised.value)
    assert "\n" not in line
    assert line == (f"freeze ledger: stage 'head' froze {target}, but the {kind} changed between "
                    "its fingerprint at the stage's start and after epoch 2")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == line
    assert metrics["ledger"]["head"]["held"] is False
    assert target in metrics["ledger"]["head"]["broken"]


@pytest.mark.slow
def test_a_resume_from_weights_that_moved_is_refused_by_the_ledger(tmp_path, one_thread):
    overrides = [*SMALL, "trainer.epochs=1"]
    train(compose_train(overrides), tmp_path, overrides)
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["loop"]["ledger"]["stage"] == 0
    ckpt["model"]["backbone.conv_stem.weight"] += 1  # the frozen backbone is not the same
    torch.save(ckpt, path)
    with pytest.raises(FreezeLedgerError, match="froze backbone.conv_stem.weight, but the "
                       "tensor changed between its fingerprint at the checkpointed stage's "
                       "start and after the resume"):
        resume_run(tmp_path, ["trainer.epochs=2"])


# --- the LR finder's warm-up is the run's loop ---------------------------------------------------


@pytest.mark.slow
def test_the_lr_finder_warm_up_equals_the_runs_first_stage_bit_for_bit(tmp_path, one_thread):
    """Accumulation, clipping, MixUp and the schedule as the run has them: the warm-up's model
    and optimizer state at the finetune stage are the run's after its head stage."""
    overrides = [*SMALL, "freeze=two_stage", "freeze.head_epochs=2", "freeze.finetune_epochs=1",
                 "trainer.deterministic=true", "trainer.accumulate_grad_batches=2",
                 "trainer.gradient_clip_val=0.5", "augment.mixup_alpha=0.4",
                 "scheduler=cosine", "trainer.keep_checkpoints=all"]
    train(compose_train(overrides), tmp_path, overrides)
    after_head = torch.load(tmp_path / "checkpoints" / "epoch_2.pt", weights_only=True)
    setup = prepare_stage(load_config(compose_train(overrides), overrides), "finetune",
                          warmup=True)
    warm = setup.model.state_dict()
    assert warm.keys() == after_head["model"].keys()
    for name, tensor in after_head["model"].items():
        assert torch.equal(warm[name].cpu(), tensor), name
    # the head's Adam moments carried into the finetune stage are the run's after epoch 2
    names = {id(p): n for n, p in setup.model.named_parameters()}
    saved = after_head["optimizer"]["state"]
    moments = {names[id(p)]: s["exp_avg"] for p, s in setup.optimizer.state.items()}
    assert set(moments) == {n for n in names.values() if n.startswith("head.")}
    assert sorted(float(m.abs().sum()) for m in moments.values()) == \
        sorted(float(s["exp_avg"].abs().sum()) for s in saved.values())


# --- every staged policy is extended by its own registry entry --------------------------------


def _saved(overrides: list[str]) -> dict:
    return load_config(compose_train([*SMALL, *overrides])).as_dict()


@pytest.mark.parametrize("policy, key, last", [
    (["freeze=two_stage"], "freeze.finetune_epochs", "finetune"),
    (["freeze=lp_ft"], "freeze.finetune_epochs", "finetune"),
    (["freeze=linear_probe", "trainer.epochs=2"], "trainer.epochs", "head"),
    (["freeze=surgical", "trainer.epochs=2"], "trainer.epochs", "block0"),
    (["freeze=top_k", "trainer.epochs=2"], "trainer.epochs", "top2"),
    (["freeze=lora", "trainer.epochs=2"], "trainer.epochs", "lora"),
    (["freeze=discriminative", "trainer.epochs=2"], "trainer.epochs", "all"),
    (["freeze=none", "trainer.epochs=2"], "trainer.epochs", "all"),
])
def test_every_staged_policy_extends_its_last_stage_by_its_own_key(policy, key, last):
    saved = _saved(policy)
    before = [s["epochs"] for s in saved["freeze"]["stages"]]
    done = sum(before[:-1]) + 1  # stopped in its last stage
    raw = resumed_config(saved, [f"{key}=7"], done)
    stages = raw["freeze"]["stages"]
    assert stages[-1]["name"] == last and stages[-1]["epochs"] == 7
    assert [s["epochs"] for s in stages[:-1]] == before[:-1]
    assert load_config(raw).freeze.total_epochs == sum(before[:-1]) + 7
    other = ({"trainer.epochs", "freeze.finetune_epochs"} - {key}).pop()
    with pytest.raises(UserError, match=f"{other} does not extend a {policy[0]} run: its last "
                       f"stage \\({last}\\) takes {key}=N"):
        resumed_config(saved, [f"{other}=7"], done)


def test_gradual_and_autoencoder_runs_say_how_they_extend():
    with pytest.raises(UserError, match="freeze=gradual: its stages are planned from its "
                       "settings"):
        resumed_config(_saved(["freeze=gradual"]), ["trainer.epochs=9"], 2)
    saved = load_config(compose_train(["experiment=ae_pretrain", "trainer.epochs=2", *FAST]))
    raw = resumed_config(saved.as_dict(), ["trainer.epochs=5"], 2)
    assert raw["trainer"]["epochs"] == 5
    with pytest.raises(UserError, match="freeze.finetune_epochs does not extend an autoencoder"):
        resumed_config(saved.as_dict(), ["freeze.finetune_epochs=5"], 2)


@pytest.mark.slow
def test_resume_of_a_finished_lp_ft_run_extends_its_finetune_stage(tmp_path, one_thread):
    overrides = [*SMALL, "freeze=lp_ft", "freeze.probe_epochs=1", "freeze.finetune_epochs=1"]
    train(compose_train(overrides), tmp_path, overrides)
    with pytest.raises(UserError, match="give its last stage more with "
                       "freeze.finetune_epochs=N"):
        resume_run(tmp_path)
    result = resume_run(tmp_path, ["freeze.finetune_epochs=3"])
    history = result.metrics["history"]
    assert [(h["epoch"], h["stage"]) for h in history] == \
        [(1, "probe"), (2, "finetune"), (3, "finetune"), (4, "finetune")]
    assert result.metrics["ledger"]["finetune"]["checks"] == ["resume", "end"]


def test_set_train_mode_is_what_the_ledger_promises_for_statistics():
    """The statistics promised are those of the BatchNorm layers the stage keeps in eval."""
    model, backbone = tiny_model()
    plan = _plan(model, backbone, ["head", "blocks[-1]"])
    apply_stage(model, plan)
    set_train_mode(model, plan)
    modules = dict(model.named_modules())
    params = {n for n, _ in model.named_parameters()}
    for name in promised(model, plan):
        if name not in params:
            assert not modules[name.rsplit(".", 1)[0]].training


# --- the hook points, in the order the docs give them --------------------------------------------


class _Points(Hook):
    """Records every point it is called at (step points once per stage, to keep it short)."""

    def __init__(self):
        self.seen: list[str] = []

    def _add(self, point: str, loop) -> None:
        entry = f"{point}:{loop.plan.name if loop.plan else '-'}"
        if point not in ("on_step_start", "on_step_end") or entry not in self.seen:
            self.seen.append(entry)


for _point in ("on_fit_start", "setup_stage", "on_stage_start", "on_step_start", "on_step_end",
               "on_train_epoch_end", "on_epoch_end", "on_stage_end", "on_fit_end"):
    setattr(_Points, _point, lambda self, loop, _p=_point: self._add(_p, loop))
_Points.on_validation_end = lambda self, loop, record: self._add("on_validation_end", loop)


def test_fit_stages_calls_every_hook_point_in_order():
    from torch.utils.data import DataLoader, TensorDataset

    from transferlab.config.schema import AdamConfig, SchedulerConfig
    from transferlab.engine.context import EpochContext
    from transferlab.engine.epoch import CrossEntropy
    from transferlab.engine.stages import Loop, fit_stages

    torch.manual_seed(0)
    model, backbone = tiny_model()
    policy = FreezeConfig(name="custom", stages=[
        StageSpec(name="head", epochs=1, train=[SelectorSpec("head")]),
        StageSpec(name="top", epochs=1,
                  train=[SelectorSpec("head"), SelectorSpec("blocks[-1]")])])
    plans = plan_stages(model, backbone, policy, 0.01)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    loader = DataLoader(data, batch_size=4)
    points = _Points()
    loop = Loop(model=model, plans=plans, ctx=EpochContext.cpu(), train_loader=loader,
                val_loader=DataLoader(data, batch_size=4), optimizer_cfg=AdamConfig(lr=0.01),
                scheduler_cfg=SchedulerConfig(), train_objective=CrossEntropy(),
                eval_objective=CrossEntropy(), hooks=[points])
    fit_stages(loop)
    per_stage = ["setup_stage", "on_stage_start", "on_step_start", "on_step_end",
                 "on_train_epoch_end", "on_validation_end", "on_epoch_end", "on_stage_end"]
    assert points.seen == ["on_fit_start:-", *[f"{p}:head" for p in per_stage],
                           *[f"{p}:top" for p in per_stage], "on_fit_end:top"]
    assert loop.step == 4 and loop.epoch == 2  # two optimizer steps an epoch, two epochs


@pytest.mark.slow  # 3.5 s
def test_a_range_test_step_is_one_optimizer_step_of_accumulated_batches():
    from torch.utils.data import DataLoader, TensorDataset

    from transferlab.engine.context import EpochContext
    from transferlab.engine.epoch import CrossEntropy
    from transferlab.engine.stepping import StepOptions
    from transferlab.tools.lr_find import range_test

    torch.manual_seed(0)
    model, backbone = tiny_model()
    plan = _plan(model, backbone, ["head"])
    apply_stage(model, plan)
    cfg = load_config(compose_train(SMALL)).optimizer
    optimizer = stage_optimizer(model, plan, cfg, None)
    batches = []
    data = TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 3, (24,)))

    class Counting(DataLoader):
        def __iter__(self):
            for batch in super().__iter__():
                batches.append(len(batch[1]))
                yield batch

    test = range_test(model, optimizer, Counting(data, batch_size=4), CrossEntropy(),
                      EpochContext.cpu(), base_lr=cfg.lr, start_lr=1e-5, end_lr=1e-3, steps=5,
                      stepping=StepOptions(accumulate=3))
    assert len(test.lrs) == 5 and len(batches) == 15  # 5 steps x 3 batches, cycling the data
