"""Sweeps that spend compute where it pays: pause and exact resume, sweeps across a group's
options with keys of some of them, and the halving sweeper (its rung arithmetic, ranking,
record, and a killed sweep resumed with ``resume=auto``)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from transferlab.cli import compare as compare_cli
from transferlab.config import load_config
from transferlab.config.sweep_keys import drop_unused, optional_keys, relaxed
from transferlab.errors import UserError
from transferlab.run import resume_run, train
from transferlab.run.resume import job_action, reached, resumed_config
from transferlab.tools.halving import (
    Halving,
    HalvingPlan,
    configurations,
    ranked,
    run_value,
)

from .conftest import TINY, cli, compose_train
from .test_sweeps import _start

# --- the rung arithmetic --------------------------------------------------------------------


def plan(eta=3, min_epochs=1, rungs=None, max_epochs=None) -> HalvingPlan:
    return HalvingPlan(eta, min_epochs, rungs, max_epochs)


def test_nine_configurations_at_eta_3_train_21_epochs_of_plans_of_9():
    p, alive, trained, done = plan(), 9, 0, 0
    for rung in range(10):
        pause = p.pause_point(rung, alive)
        budget = 9 if pause is None else min(pause, 9)
        trained += alive * (budget - done)
        if p.is_last(rung, alive):
            break
        alive, done = p.going_on(alive), budget
    assert (rung, budget, trained) == (2, 9, 9 * 1 + 3 * 2 + 1 * 6)


def test_budgets_given_capped_and_checked():
    assert [plan(eta=2, min_epochs=2).budget(r) for r in range(4)] == [2, 4, 8, 16]
    assert [plan(max_epochs=5).budget(r) for r in range(3)] == [1, 3, 5]
    assert plan(max_epochs=5).is_last(2, 4) and plan(max_epochs=5).pause_point(2, 4) == 5
    given = plan(rungs=[2, 5, 20])
    assert [given.budget(r) for r in range(3)] == [2, 5, 20] and given.is_last(2, 9)
    assert not given.is_last(1, 9) and given.pause_point(2, 9) is None
    assert plan().going_on(2) == 1 and plan().going_on(24) == 8
    for bad in ({"eta": 1}, {"min_epochs": 0}, {"rungs": [3, 2]}, {"rungs": []},
                {"max_epochs": 0}):
        with pytest.raises(UserError, match="hydra.sweeper"):
            plan(**bad)


def test_ranking_breaks_ties_by_order_and_puts_failed_runs_last():
    assert ranked([0.5, 0.9, None, 0.9, 0.1], "max") == [1, 3, 0, 4, 2]
    assert ranked([0.5, 0.9, None, 0.1, 0.1], "min") == [3, 4, 0, 1, 2]


def test_a_runs_value_is_its_best_up_to_the_budget():
    history = [{"epoch": e, "val_acc": a, "val_loss": 1 - a}
               for e, a in enumerate([0.5, 0.7, 0.6, 0.9], start=1)]
    status = {"status": "paused", "history": history, "paused": {"epoch": 4}}
    assert run_value(status, "val_acc", "max", 3) == 0.7
    assert run_value(status, "val_loss", "min", None) == pytest.approx(0.1)
    assert run_value({**status, "status": "failed"}, "val_acc", "max", 3) is None
    assert reached(status, 4) and reached(status, 2) and not reached(status, 5)
    assert not reached(status, None) and reached({"status": "completed"}, None)


def parsed(*overrides: str):
    return OverridesParser.create().parse_overrides(list(overrides))


def test_configurations_are_the_grid_with_one_job_per_fold():
    configs = configurations(parsed("optimizer.lr=1e-2,1e-3", "freeze=linear_probe,lp_ft",
                                    "dataset.fold=0,1,2", "dataset.folds=3"),
                             ["dataset.fold", "seed"], None, 0)
    assert [c.overrides for c in configs[:2]] == [
        ["optimizer.lr=0.01", "freeze=linear_probe"], ["optimizer.lr=0.01", "freeze=lp_ft"]]
    assert len(configs) == 4 and all(len(c.jobs) == 3 for c in configs)
    assert configs[1].jobs[2].overrides == ["optimizer.lr=0.01", "freeze=lp_ft",
                                            "dataset.fold=2", "dataset.folds=3"]
    subdirs = [j.subdir for c in configs for j in c.jobs]
    assert len(set(subdirs)) == 12 and subdirs[0].startswith("0_")


def test_grid_points_that_differ_only_by_keys_their_policy_does_not_use_are_one():
    argv = ["freeze=linear_probe,two_stage", "freeze.fine_tune_at=-2,-4"]
    optional = [k.key for k in optional_keys(["-m", *argv])]
    configs = configurations(parsed(*relaxed(argv, optional_keys(["-m", *argv]))), [], None,
                             0, optional)
    assert [c.overrides for c in configs] == [
        ["freeze=linear_probe"], ["freeze=two_stage", "++freeze.fine_tune_at=-2"],
        ["freeze=two_stage", "++freeze.fine_tune_at=-4"]]
    assert [c.jobs[0].subdir for c in configs] == [
        "0_freeze-linear_probe", "1_freeze-two_stage__freeze.fine_tune_at--2",
        "2_freeze-two_stage__freeze.fine_tune_at--4"]


def test_intervals_are_sampled_with_a_seed():
    args = ("optimizer.lr=tag(log,interval(1e-4,1e-1))", "freeze=linear_probe,lp_ft",
            "freeze.finetune_epochs=int(interval(2,6))")
    first = configurations(parsed(*args), [], 5, seed=7)
    assert [c.overrides for c in first] == [c.overrides for c in
                                            configurations(parsed(*args), [], 5, seed=7)]
    assert [c.overrides for c in first] != [c.overrides for c in
                                            configurations(parsed(*args), [], 5, seed=8)]
    for config in first:
        values = dict(o.split("=") for o in config.overrides)
        assert 1e-4 <= float(values["optimizer.lr"]) <= 1e-1
        assert int(values["freeze.finetune_epochs"]) in range(2, 7)
    with pytest.raises(UserError, match="hydra.sweeper.samples=N"):
        configurations(parsed(*args), [], None, 0)


def test_folds_with_the_same_accuracies_in_another_order_tie(tmp_path):
    """The hymenoptera study's rung 0 (2026-12-06): 3-fold means that a plain sum put one bit
    apart, so the float's last bit, not the command line's order, decided who went on."""
    folds, other = [75 / 82, 76 / 81, 77 / 82], [75 / 82, 77 / 82, 76 / 81]
    assert sum(folds) / 3 != sum(other) / 3  # the plain means differ in the last bit
    configs = configurations(parsed("optimizer.lr=1e-2,1e-3", "dataset.fold=0,1,2"),
                             ["dataset.fold"], None, 0)
    halving = Halving(plan(eta=2), configs, tmp_path)
    for config, order in zip(configs, [other, folds], strict=True):
        for job, value in zip(config.jobs, order, strict=True):
            (tmp_path / job.subdir).mkdir()
            (tmp_path / job.subdir / "metrics.json").write_text(json.dumps(
                {"status": "paused", "history": [{"epoch": 1, "val_acc": value}],
                 "paused": {"epoch": 1}}))
    on = halving.score(0, configs)
    assert configs[0].value == configs[1].value == round(math.fsum(folds) / 3, 12)
    assert [c.index for c in on] == [0] and halving.rungs[0]["tied_at_cut"] == 2


def test_a_rung_launches_only_the_jobs_short_of_its_budget(tmp_path):
    configs = configurations(parsed("optimizer.lr=1e-2,1e-3,1e-4"), [], None, 0)
    halving = Halving(plan(), configs, tmp_path)
    for config, (status, epochs) in zip(configs, [("paused", 1), ("completed", 1),
                                                  ("failed", 0)], strict=True):
        (tmp_path / config.jobs[0].subdir).mkdir()
        history = [{"epoch": 1, "val_acc": 0.5}][:epochs]
        (tmp_path / config.jobs[0].subdir / "metrics.json").write_text(json.dumps(
            {"status": status, "history": history, "paused": {"epoch": 1}}))
    assert halving.rung_jobs(0, configs) == [[*configs[2].jobs[0].overrides,
                                              "trainer.pause_after_epoch=1", "resume=auto",
                                              f"hydra.sweep.subdir='{configs[2].jobs[0].subdir}'"]]
    on = halving.score(0, configs)
    assert [c.index for c in on] == [0]  # the tie goes to the first; the failed one is last
    assert halving.rungs[0]["tied_at_cut"] == 2  # (and a warning says so)
    record = json.loads((tmp_path / "halving.json").read_text())
    assert [c["config"] for c in record["rungs"][0]["configurations"]] == [0, 1, 2]
    assert record["epochs_trained"] == 2 and "winner" not in record


def test_a_bad_mode_is_one_line(tmp_path):
    with pytest.raises(UserError, match="hydra.sweeper.mode must be max or min"):
        Halving(plan(), [], tmp_path, mode="best")


# --- sweeps across a group's options ----------------------------------------------------------


def test_a_key_of_some_swept_options_applies_to_their_jobs_only():
    argv = ["-m", "optimizer.lr=1e-2,1e-3", "freeze=linear_probe,two_stage,lp_ft",
            "freeze.head_epochs=1", "freeze.finetune_epochs=2", "trainer.epochs=3"]
    keys = {k.key: k for k in optional_keys(argv)}
    assert set(keys) == {"freeze.head_epochs", "freeze.finetune_epochs", "trainer.epochs"}
    assert keys["freeze.head_epochs"].line() == (
        "freeze.head_epochs: not used by the 4 jobs with freeze=linear_probe,lp_ft (it belongs "
        "to freeze=two_stage)")
    assert keys["trainer.epochs"].others == ["two_stage", "lp_ft"]
    assert relaxed(argv, list(keys.values()))[3:] == [
        "++freeze.head_epochs=1", "++freeze.finetune_epochs=2", "trainer.epochs=3"]


def test_a_key_of_every_or_no_swept_option_and_one_run_stay_as_they_are():
    assert optional_keys(["-m", "freeze=two_stage,lp_ft", "freeze.finetune_epochs=2"]) == []
    assert optional_keys(["-m", "freeze=linear_probe,lp_ft", "freeze.bogus=2"]) == []
    assert optional_keys(["freeze=linear_probe", "freeze.head_epochs=2"]) == []
    with pytest.raises(UserError, match="freeze has no such key"):
        load_config(compose_train(["freeze=linear_probe", "++freeze.head_epochs=1"]),
                    ["++freeze.head_epochs=1"])


def test_a_job_drops_the_keys_its_option_does_not_have():
    given = ["freeze=linear_probe", "++freeze.head_epochs=1", "++freeze.finetune_epochs=2",
             "trainer.epochs=3"]
    keys = ["freeze.head_epochs", "freeze.finetune_epochs", "trainer.epochs"]
    cfg, overrides = drop_unused(compose_train(given), given, keys)
    assert overrides == ["freeze=linear_probe", "trainer.epochs=3"]
    assert load_config(cfg, overrides).freeze.total_epochs == 3
    given = ["freeze=two_stage", "++freeze.head_epochs=1", "++freeze.finetune_epochs=2",
             "trainer.epochs=3"]
    cfg, overrides = drop_unused(compose_train(given), given, keys)
    assert overrides == given[:3]
    assert [s.epochs for s in load_config(cfg, overrides).freeze.stages] == [1, 2]


# --- pause and resume -------------------------------------------------------------------------


def _status(tmp_path: Path, status: str, epoch: int) -> Path:
    (tmp_path / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "metrics.json").write_text(json.dumps({"status": status,
                                                       "paused": {"epoch": epoch}}))
    return tmp_path


def test_resume_auto_skips_a_job_paused_at_its_pause_point_and_resumes_it_past_it(tmp_path):
    run = _status(tmp_path, "paused", 3)
    assert [job_action(run, p) for p in (2, 3, 4, None)] == ["skip", "skip", "resume", "resume"]
    assert job_action(_status(tmp_path, "interrupted", 3), 3) == "resume"


def test_a_resume_drops_the_pause_point_unless_given_a_later_one():
    saved = load_config(compose_train([*TINY, "trainer.epochs=5",
                                       "trainer.pause_after_epoch=2"])).as_dict()
    assert resumed_config(saved, [], 2)["trainer"]["pause_after_epoch"] is None
    assert resumed_config(saved, ["trainer.pause_after_epoch=4"], 2)["trainer"][
        "pause_after_epoch"] == 4
    with pytest.raises(UserError, match="pause_after_epoch=2: the run has done 2 epochs"):
        resumed_config(saved, ["trainer.pause_after_epoch=2"], 2)
    with pytest.raises(UserError, match="trainer.pause_after_epoch must be"):
        load_config(compose_train(["trainer.pause_after_epoch=0"]))


TWO_STAGE = ["backbone=timm", "backbone.name=test_efficientnet", "backbone.pretrained=false",
             "dataset.image_size=32", "trainer.num_workers=0", "trainer.progress=false",
             "trainer.deterministic=true", "freeze=two_stage", "freeze.head_epochs=2",
             "freeze.finetune_epochs=2", "freeze.fine_tune_at=-2"]


@pytest.mark.slow
def test_a_run_paused_twice_and_resumed_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    reference = train(compose_train(TWO_STAGE), tmp_path / "ref", overrides=TWO_STAGE)
    given = [*TWO_STAGE, "trainer.pause_after_epoch=1"]
    paused = train(compose_train(given), tmp_path / "run", overrides=given)
    assert paused.metrics["status"] == "paused" and paused.metrics["paused"] == {"epoch": 1,
                                                                                 "of": 4}
    assert paused.metrics["resume_command"].endswith(f"resume={tmp_path / 'run'}")
    again = resume_run(tmp_path / "run", ["trainer.pause_after_epoch=3"])  # across the stages
    assert again.metrics["status"] == "paused" and len(again.metrics["history"]) == 3
    done = resume_run(tmp_path / "run")
    assert done.metrics["status"] == "completed" and "paused" not in done.metrics
    a, b = (torch.load(r.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
            for r in (reference, done))
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) == 0.0
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in done.metrics["history"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in reference.metrics["history"]]
    assert "trainer.pause_after_epoch" not in paused.metrics["hparams"]


# --- the sweeper through the console script ---------------------------------------------------

HALVING = ["-m", "hydra/sweeper=halving", "hydra.sweeper.eta=2", *TINY,
           "dataset.val_fraction=0.25", "trainer.deterministic=true",
           "optimizer.lr=3e-2,1e-3", "freeze=linear_probe,two_stage", "trainer.epochs=4",
           "freeze.head_epochs=2", "freeze.finetune_epochs=2"]


def session_hparams(tb_dir: Path) -> dict:
    """The HParams of a run's TensorBoard session, as the dashboard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.number_value if v.HasField("number_value") else v.string_value
            for k, v in info.hparams.items()}


def _record(cwd: Path) -> dict | None:
    found = list((cwd / "outputs" / "sweeps").glob("*/*/halving.json"))
    try:
        return json.loads(found[0].read_text()) if found else None
    except ValueError:
        return None


@pytest.mark.slow
def test_a_halving_sweep_killed_in_a_rung_goes_on_with_resume_auto(tmp_path, capsys):
    """4 configurations, eta 2, plans of 4 epochs: 4 x 1 epoch, 2 to epoch 2, 1 to epoch 4
    (8 epochs). Killed (SIGKILL) once rung 0 is recorded; resume=auto does not launch rung
    0's jobs again, and the sweep ends as one that was never killed."""
    proc = _start(HALVING, tmp_path, start_new_session=True)
    deadline = time.monotonic() + 240
    while (_record(tmp_path) or {}).get("rungs", []) == []:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    first = _record(tmp_path)
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    losers = [c for c in first["rungs"][0]["configurations"] if not c["went_on"]]
    def stamp(config: int) -> tuple:  # a run's last write: its process and time
        run = sweep / first["configurations"][config]["runs"][0]
        record = json.loads((run / "metrics.json").read_text())
        return record["pid"], record["updated_at"], record["status"]

    stamps = {c["config"]: stamp(c["config"]) for c in losers}
    again = cli([*HALVING, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resume=auto: going on with {sweep.relative_to(tmp_path)}" in again.stdout
    record = _record(tmp_path)
    assert record["rungs"][0] == first["rungs"][0]
    assert [r["budget"] for r in record["rungs"]] == [1, 2, None]
    assert record["epochs_trained"] == 4 * 1 + 2 * 1 + 1 * 2
    assert len(stamps) == 2
    for config, before in stamps.items():  # not launched again: still paused
        assert stamp(config) == before and before[2] == "paused"
    winner = record["winner"]
    run = sweep / record["configurations"][winner["config"]]["runs"][0]
    final = json.loads((run / "metrics.json").read_text())
    assert final["status"] == "completed" and len(final["history"]) == 4
    assert [e["epoch"] for e in final["history"]] == [1, 2, 3, 4]  # continued, not retrained
    assert math.isclose(winner["value"], max(e["val_acc"] for e in final["history"]))
    for config in record["configurations"]:  # the rung each run reached, in its HParams
        run = sweep / config["runs"][0]
        assert json.loads((run / "metrics.json").read_text())["hparams"]["halving.rung"] == \
            config["rung"]
    assert session_hparams(run / "tb")["halving.rung"] == config["rung"]
    assert "Halving (val_acc, max; eta 2)" in again.stdout
    assert ("freeze.head_epochs: not used by the 2 jobs with freeze=linear_probe (it belongs to "
            "freeze=two_stage)") in again.stdout
    capsys.readouterr()
    assert compare_cli.main([str(sweep), "rung=1", "format=csv"]) == 0  # rung 1: at epoch 2
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted((r["status"], r["epochs"]) for r in rows) == [("paused", "2"), ("went on", "2")]
    assert "paused" in again.stdout  # the sweep's table shows the losers as paused


def test_the_halving_sweeper_is_registered_with_hydra():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    from transferlab.config import compose_config

    cfg = compose_config(["hydra/sweeper=halving", "hydra.sweeper.eta=4"], with_hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("transferlab_halving.halving_sweeper."
                                               "HalvingSweeper")
    assert (cfg.hydra.sweeper.eta, cfg.hydra.sweeper.min_epochs) == (4, 1)
    assert "HalvingSweeper" in [p.__name__ for p in Plugins.instance().discover(Sweeper)]
