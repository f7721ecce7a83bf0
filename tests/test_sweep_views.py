"""A sweep you can trust and read: the same numbers on every launcher and worker count, one
TensorBoard view with every swept key, seed groups as mean and band, compare output for
people, epochs that mean one thing, names that can be passed back as overrides."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from transferlab.cli import compare as compare_cli
from transferlab.config import load_config
from transferlab.errors import UserError
from transferlab.run.images import sample_indices
from transferlab.tools import compare
from transferlab.tools.tensorboard_views import write_seed_groups, write_union_hparams

from .conftest import TINY, cli


def _fake_run(root: Path, name: str, overrides: list[str], accs: list[float],
              status: str = "completed", hparams: dict | None = None) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    history = [{"epoch": e, "stage": "head", "train_loss": 1.0 / e, "train_acc": a,
                "val_loss": 1.0 - a, "val_acc": a, "lr": {}, "seconds": 1.0}
               for e, a in enumerate(accs, start=1)]
    final = {"epoch": len(accs), "val_acc": accs[-1], "val_loss": 1.0 - accs[-1]}
    best = max(history, key=lambda r: r["val_acc"])
    data = {"status": status, "history": history if status == "completed" else [],
            "best": {k: best[k] for k in ("epoch", "val_acc", "val_loss")}
            if status == "completed" else None,
            "final": final if status == "completed" else None,
            "params": {"total": 3383818, "trainable": 3383818}, "wall_seconds": 12.5,
            "hparams": hparams or {}}
    if status == "failed":
        data["error"] = "optimizer.lr must be > 0"
    (job / "metrics.json").write_text(json.dumps(data))
    return job


def _experiment(root: Path) -> plugin_data_pb2.HParamsPluginData:
    acc = EventAccumulator(str(root))
    acc.Reload()
    raw = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(raw).experiment


# -- fast: the pieces ---------------------------------------------------------------------------


def test_union_hparams_hold_every_key_of_every_run(tmp_path):
    runs = [{"freeze": "linear_probe", "seed": 0, "optimizer.lr": 0.001},
            {"task": "autoencoder", "seed": 1, "trainer.epochs": 3},
            {"freeze": "two_stage", "head": "linear", "deterministic": True}]
    write_union_hparams(tmp_path, runs)
    write_union_hparams(tmp_path, runs)  # rewritten, not added to
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    experiment = _experiment(tmp_path)
    names = {h.name for h in experiment.hparam_infos}
    assert names == {"freeze", "seed", "optimizer.lr", "task", "trainer.epochs", "head",
                     "deterministic"}
    freeze = next(h for h in experiment.hparam_infos if h.name == "freeze")
    assert list(freeze.domain_discrete.values) and {v.string_value for v in
                                                    freeze.domain_discrete.values} == {
        "linear_probe", "two_stage"}
    assert {m.name.tag for m in experiment.metric_infos} >= {"hparam/best_val_acc",
                                                             "hparam/final_val_loss"}


def test_the_keys_that_differ_are_marked_and_come_first(tmp_path):
    """TensorBoard's HParams table shows the columns whose ``differs`` is true first (and,
    with all false, the first five by name: the swept ``optimizer.lr`` hidden)."""
    runs = [{"augment": "none", "backbone": "lite0", "dataset": "digits", "freeze": "lp",
             "head": "linear", "optimizer": "adam", "optimizer.lr": lr, "seed": 0}
            for lr in (1e-3, 1e-2, 1e-1)]
    runs[2]["trainer.label_smoothing"] = 0.1  # a key one run has: differs too
    write_union_hparams(tmp_path, runs)
    infos = _experiment(tmp_path).hparam_infos
    assert [(h.name, h.differs) for h in infos[:2]] == [("optimizer.lr", True),
                                                        ("trainer.label_smoothing", True)]
    assert not any(h.differs for h in infos[2:]) and len(infos) == 9


def test_a_long_group_label_is_capped_and_two_that_share_a_start_stay_two_folders(tmp_path):
    common = [f"trainer.some_long_option_{i}=a_long_value_{i}" for i in range(12)]
    a = compare.group_label([*common, "optimizer.lr=0.1", "seed=0"])
    b = compare.group_label([*common, "optimizer.lr=0.01", "seed=0"])
    assert a != b and len(a) == len(b) == 120 and a[:100] == b[:100]
    assert compare.group_label(["freeze=none", "seed=1"]) == "freeze-none"  # short: as it is
    histories = [[{"epoch": 1, "val_acc": 0.5}], [{"epoch": 1, "val_acc": 0.7}]]
    write_seed_groups(tmp_path, {a: histories, b: histories})  # a 400-byte name would fail
    assert sorted(p.name for p in (tmp_path / "seed_groups").iterdir()) == sorted([a, b])


def test_seed_groups_write_mean_min_max_runs(tmp_path):
    histories = [[{"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "train_acc": 0.4,
                   "train_loss": 2.0}, {"epoch": 2, "val_acc": 0.7, "val_loss": 0.8,
                                        "train_acc": 0.6, "train_loss": 1.0}],
                 [{"epoch": 1, "val_acc": 0.7, "val_loss": 0.6, "train_acc": 0.6,
                   "train_loss": 1.0}, {"epoch": 2, "val_acc": 0.9, "val_loss": 0.4,
                                        "train_acc": 0.8, "train_loss": 0.5}]]
    write_seed_groups(tmp_path, {"freeze-linear_probe": histories, "alone": histories[:1]})
    group = tmp_path / "seed_groups" / "freeze-linear_probe"
    assert sorted(p.name for p in group.iterdir()) == ["max", "mean", "min"]
    assert not (tmp_path / "seed_groups" / "alone").exists()  # one run: no band
    for stat, expected in (("mean", [0.6, 0.8]), ("min", [0.5, 0.7]), ("max", [0.7, 0.9])):
        acc = EventAccumulator(str(group / stat))
        acc.Reload()
        assert [e.step for e in acc.Scalars("val/acc")] == [1, 2]
        assert [e.value for e in acc.Scalars("val/acc")] == pytest.approx(expected)


def test_group_plot_draws_the_mean_the_table_shows(tmp_path, capsys):
    for seed, accs in enumerate([[0.5, 0.8], [0.6, 0.9], [0.7, 0.7]]):
        _fake_run(tmp_path, f"{seed}_x", ["freeze=two_stage", f"seed={seed}"], accs)
    runs = compare.group_seeds(compare.find_runs([tmp_path]))
    (group,) = runs
    epochs, mean, low, high = compare.curve_points(group)
    assert epochs == [1, 2]
    assert mean[-1] == pytest.approx(group.value("final_val_acc"))  # the table's mean
    assert (low[-1], high[-1]) == pytest.approx((0.7, 0.9))
    assert compare_cli.main([str(tmp_path), "group_seeds=true"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert f"{group.value('final_val_acc'):.4f} ± " in row


def test_failed_runs_are_hidden_by_default_and_counted(tmp_path, capsys):
    _fake_run(tmp_path, "0_a", ["seed=0"], [0.5, 0.6])
    _fake_run(tmp_path, "1_b", ["seed=1"], [0.5], status="failed")
    assert compare_cli.main([str(tmp_path), "plot=false"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 3 and "failed" not in out
    assert "(1 failed run(s) hidden: all=true shows them)" in err
    assert compare_cli.main([str(tmp_path), "plot=false", "all=true"]) == 0
    assert "failed: optimizer.lr must be > 0" in capsys.readouterr().out


def test_a_table_fits_its_width_and_writes_what_it_cut_below(tmp_path):
    """A failed job's long error and long overrides no longer make a 600-character line: the
    table fits the terminal, and each cut cell is written in full, wrapped, below it."""
    long = [f"dataset.root=/data/{'very_long_folder_name_' * 3}{i}" for i in range(2)]
    _fake_run(tmp_path, "0_a", [*long, "seed=0"], [0.5, 0.6])
    failed = _fake_run(tmp_path, "1_b", [*long, "seed=1"], [0.5], status="failed")
    error = "cannot read " + "/data/some/deep/folder/" * 12 + "image.png: truncated file"
    data = json.loads((failed / "metrics.json").read_text())
    (failed / "metrics.json").write_text(json.dumps({**data, "error": error}))
    runs = [compare.read_run(p) for p in sorted(tmp_path.iterdir())]
    wide = compare.format_table(runs, root=tmp_path, width=1000)
    assert max(len(line) for line in wide.splitlines()) > 300  # as it was
    text = compare.format_table(runs, root=tmp_path, width=120)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, text
    header, rows = lines[:2], lines[3:5]  # headers of several words on two lines
    assert header[0].split()[:3] == ["best", "95%", "best"]  # bottom-aligned
    assert header[1].split()[:5] == ["run", "overrides", "status", "val", "acc"]
    assert rows[1].startswith("1 ") and "failed: cannot" in rows[1] and "…" in rows[1]
    below = lines[lines.index("") + 1:]
    assert all(line.startswith(("0 overrides: ", "1 overrides: ", "1 status: ", "    "))
               for line in below), below
    status = below.index(next(line for line in below if line.startswith("1 status: ")))
    wrapped = below[status:]
    assert "".join(line.removeprefix("    ") for line in wrapped).replace(" ", "") == \
        f"1 status: failed: {error}".replace(" ", "")


def test_csv_numbers_are_written_for_people(tmp_path, capsys):
    for seed in (0, 1):
        _fake_run(tmp_path, f"{seed}_a", [f"seed={seed}"], [0.5, 0.123456789])
    assert compare_cli.main([str(tmp_path), "format=csv", "group_seeds=true"]) == 0
    text = capsys.readouterr().out
    assert "3383818" in text and "e+" not in text and "0.123457" in text


def test_report_holds_the_table_the_figure_and_the_best_command(tmp_path, capsys):
    _fake_run(tmp_path / "s", "0_a", ["freeze=two_stage", "optimizer.lr=0.001"], [0.5, 0.9])
    _fake_run(tmp_path / "s", "1_b", ["freeze=linear_probe", "optimizer.lr=0.001"], [0.5, 0.6])
    report = tmp_path / "doc" / "results.md"
    assert compare_cli.main([str(tmp_path / "s"), f"report={report}"]) == 0
    text = report.read_text()
    assert "| run | overrides |" in text
    assert "![validation accuracy](results_val_acc.png)" in text
    assert (tmp_path / "doc" / "results_val_acc.png").is_file()
    assert "transferlab-train freeze=two_stage optimizer.lr=0.001" in text


def test_sample_grid_takes_every_class_in_turn():
    labels = [0] * 10 + [1] * 3 + [2] * 5
    picks = sample_indices(labels, 8)
    assert [labels[i] for i in picks] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert sample_indices([0, 0], 16) == [0, 1]


@pytest.mark.parametrize("policy, message", [
    ("freeze=two_stage", "freeze=two_stage sets its own length (head 5 + finetune 5 epochs: "
                         "freeze.head_epochs, freeze.finetune_epochs) and does not use "
                         "trainer.epochs: remove 'trainer.epochs=2'"),
    ("freeze=gradual", "freeze=gradual sets its own length"),
])
def test_trainer_epochs_is_an_error_with_a_policy_that_sets_its_own_length(compose_cfg, policy,
                                                                            message):
    overrides = [policy, "trainer.epochs=2"]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        load_config(compose_cfg(overrides), overrides)
    for fine in (["freeze=linear_probe", "trainer.epochs=2"], ["freeze=top_k", "trainer.epochs=2"],
                 [policy, "trainer.batch_size=8"]):
        load_config(compose_cfg(fine), fine)


# -- slow: through the real CLI -----------------------------------------------------------------

INVARIANT = [*TINY, "trainer.epochs=2", "augment=flip", "dataset.train_fraction=0.3",
             "trainer.deterministic=true"]


def _history(run_dir: Path) -> list[tuple]:
    data = json.loads((run_dir / "metrics.json").read_text())
    return [(r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"])
            for r in data["history"]]


@pytest.mark.slow
def test_same_numbers_for_any_worker_count_and_launcher(tmp_path):
    """Random augmentation (flip) on: a plain run, and a joblib sweep over 0, 1, 2 loader
    processes, give the same losses and accuracies."""
    plain = cli([*INVARIANT, "hydra.run.dir=plain"], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    sweep = cli(["-m", *[o for o in INVARIANT if not o.startswith("trainer.num_workers")],
                 "trainer.num_workers=0,1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "hydra.sweep.dir=sweep"], tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    expected = _history(tmp_path / "plain")
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.name[0].isdigit())
    assert [j.name for j in jobs] == ["0_trainer.num_workers-0", "1_trainer.num_workers-1",
                                      "2_trainer.num_workers-2"]
    for job in jobs:
        assert _history(job) == expected, job.name


@pytest.fixture(scope="module")
def policy_seed_sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("views")
    proc = cli(["-m", *TINY, "freeze=linear_probe,none", "seed=0,1,2", "hydra.sweep.dir=sweep"],
               cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "sweep"


@pytest.mark.slow
def test_the_sweep_root_holds_the_union_record_and_the_seed_groups(policy_seed_sweep):
    experiment = _experiment(policy_seed_sweep)
    names = {h.name for h in experiment.hparam_infos}
    assert {"freeze", "seed"} <= names
    for job in policy_seed_sweep.glob("[0-9]*"):
        assert set(json.loads((job / "metrics.json").read_text())["hparams"]) <= names
    groups = sorted(p.name for p in (policy_seed_sweep / "seed_groups").iterdir())
    assert groups == ["freeze-linear_probe", "freeze-none"]


@pytest.mark.slow
def test_a_job_checkpoint_path_goes_back_as_an_override_unquoted(policy_seed_sweep, tmp_path):
    best = next(policy_seed_sweep.glob("0_*")) / "checkpoints" / "best.pt"
    assert "=" not in str(best.relative_to(policy_seed_sweep)) and "," not in str(best)
    proc = cli([*TINY, f"backbone.init.path={best}", "backbone.init.strip_prefix=backbone.",
                "hydra.run.dir=again"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = json.loads((tmp_path / "again" / "metrics.json").read_text())["init"]
    assert init["loaded"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_every_key_every_run_and_the_seed_bands(policy_seed_sweep):
    """A real TensorBoard over the sweep and two more runs, each with a key no other run has:
    after transferlab-compare tensorboard=true, the HParams experiment has every key of every
    run (no single run's record has them all), every run is a row, and the seed group's band
    is served from the sweep root."""
    root = policy_seed_sweep.parent
    for name, extra in (("extra_a", "trainer.label_smoothing=0.1"),
                        ("extra_b", "optimizer.weight_decay=0.01")):
        proc = cli([*TINY, extra, f"hydra.run.dir={name}"], root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert compare_cli.main([str(root), "tensorboard=true", "plot=false"]) == 0
    port = _free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(root),
                              "--port", str(port), "--host", "127.0.0.1", "--load_fast=false",
                              "--reload_interval=1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline, experiment, groups = time.time() + 120, {}, {}
        while time.time() < deadline:
            try:
                experiment = _post(f"{base}/hparams/experiment", {"experimentName": ""})
                groups = _post(f"{base}/hparams/session_groups", {
                    "experimentName": "", "startIndex": 0, "sliceSize": 100,
                    "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                        "STATUS_RUNNING"], "colParams": []})
                if len(groups.get("sessionGroups", [])) == 8:
                    break
            except OSError:
                pass
            time.sleep(1)
        columns = {h["name"] for h in experiment.get("hparamInfos", [])}
        assert {"freeze", "seed", "optimizer.lr", "trainer.label_smoothing",
                "optimizer.weight_decay"} <= columns, sorted(columns)
        # what was swept comes back marked (the HParams table shows it first), the rest not
        differs = {h["name"]: h.get("differs", False) for h in experiment["hparamInfos"]}
        assert differs["freeze"] and differs["seed"] and differs["trainer.label_smoothing"]
        assert not differs["backbone"] and not differs["dataset"], differs
        assert len(groups["sessionGroups"]) == 8  # every run a row
        band = {}
        for stat in ("mean", "min", "max"):
            points = _get(f"{base}/scalars/scalars?run=sweep/seed_groups/freeze-none/{stat}"
                          "&tag=val/acc")
            band[stat] = points[-1][2]
        assert band["min"] <= band["mean"] <= band["max"]
        accs = [json.loads((j / "metrics.json").read_text())["final"]["val_acc"]
                for j in policy_seed_sweep.glob("*freeze-none*")]
        assert band["mean"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
    finally:
        board.terminate()
        board.wait(timeout=30)


def test_the_figure_names_the_best_runs_marks_identical_curves_and_only_what_it_shows(tmp_path):
    """40 runs: the legend names the 12 best and counts the rest (no legend that squeezes the
    axes); a curve equal to another says so; the title mentions no seed band when there is
    none, nor stage boundaries a one-stage run does not have."""
    for i in range(40):
        accs = [0.5, 0.6] if i in (0, 1) else [0.3, 0.3 + i / 1000]
        _fake_run(tmp_path, f"{i}_r", [f"optimizer.lr={i}"], accs)
    runs = [compare.read_run(p) for p in sorted(tmp_path.iterdir())]
    fig = compare.val_curves_figure(runs)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == compare.LEGEND_MAX + 1
    assert labels[-1] == "28 more run(s), lower best val acc"
    assert labels[:2] == ["optimizer.lr=0", "optimizer.lr=1 (= optimizer.lr=0)"]
    assert labels[2] == "optimizer.lr=39"  # then by best val acc
    assert ax.get_title() == "validation accuracy"
    grouped = compare.group_seeds(runs[:3])  # no seed groups among distinct lrs
    assert compare.val_curves_figure(grouped).axes[0].get_title() == "validation accuracy"
    assert compare.plot_val_curves(runs, tmp_path / "f.png").stat().st_size > 0


def test_a_foreign_record_is_a_row_not_a_traceback(tmp_path, capsys):
    """A metrics.json of another tool (history entries without stage): one unreadable row,
    listed with all=true; the figure is drawn from the others."""
    _fake_run(tmp_path, "0_a", ["seed=0"], [0.5, 0.6])
    other = tmp_path / "1_other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps(
        {"status": "completed", "history": [{"epoch": 1, "val_acc": 0.5, "val_loss": 1.0}]}))
    assert compare_cli.main([str(tmp_path), "all=true"]) == 0
    out, err = capsys.readouterr()
    assert "unreadable" in out and "Traceback" not in err
    assert "no 'stage'" in out


def test_a_figure_that_cannot_be_written_is_a_warning_or_one_error_line(tmp_path, capsys):
    """A read-only sweep (here: the figure's name taken by a folder) still prints its table,
    with one warning; a figure asked for by name that cannot be written is one error line."""
    _fake_run(tmp_path, "0_a", ["seed=0"], [0.5, 0.6])
    (tmp_path / "compare_val_acc.png").mkdir()
    assert compare_cli.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "0.6000" in out
    (warning,) = [line for line in err.splitlines() if line]
    assert warning.startswith("warning: no figure: Is a directory: ") and "plot=<file>" in warning
    assert compare_cli.main([str(tmp_path), f"plot={tmp_path / 'compare_val_acc.png'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Is a directory: ")


def test_a_sweep_with_a_job_interrupted_on_its_own_does_not_end_with_exit_0(tmp_path, capsys):
    """A SIGTERM to one job's process (under joblib the sweep goes on): the summary says the
    job was interrupted and the exit code is 1, as for a failed job (before: 0 failed, exit 0,
    with a job not done)."""
    from transferlab.tools.sweep import SweepSummary

    _fake_run(tmp_path, "0_seed-0", ["seed=0"], [0.5, 0.7])
    _fake_run(tmp_path, "1_seed-1", ["seed=1"], [0.5], status="interrupted")
    SweepSummary.reset()
    SweepSummary.summarize(tmp_path)
    assert f"Sweep {tmp_path}: 2 job(s), 0 failed, 1 interrupted (resume=auto goes on with " \
           "them)" in capsys.readouterr().out
    assert SweepSummary.failed_jobs == 1
    SweepSummary.reset()
