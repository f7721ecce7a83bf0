"""Trackers (``trainer.loggers``, :mod:`transferlab.run.trackers`): what each one logs, read
back from the tracker itself: MLflow through its client from a real SQLite store, W&B from
its offline run files, csv from the file. Every number must equal ``metrics.json``'s."""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, cli, compose_train
from transferlab.config import compose_config
from transferlab.errors import UserError
from transferlab.run.trackers import epoch_metrics, flatten, open_trackers

SMALL = [*TINY, "dataset.samples_per_class=8", "trainer.epochs=2"]


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def _csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _assert_csv_equals_history(run_dir: Path) -> None:
    rows, history = _csv_rows(run_dir), _history(run_dir)
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history]
    for row, epoch in zip(rows, history, strict=True):
        assert row["stage"] == epoch["stage"]
        for key, value in epoch_metrics(epoch).items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key


def _assert_mlflow_equals_history(client, run_id: str, run_dir: Path) -> None:
    """Every number of every epoch of metrics.json is the MLflow run's metric at that step."""
    history = _history(run_dir)
    keys = set().union(*(epoch_metrics(h) for h in history))
    assert {"val_acc", "val_loss", "train_acc", "train_loss", "lr.head"} <= keys
    for key in keys:
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == {h["epoch"]: pytest.approx(epoch_metrics(h)[key], rel=1e-12)
                          for h in history}, key
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert client.get_run(run_id).data.metrics["final_val_acc"] == pytest.approx(
        final["val_acc"], rel=1e-12)


# --- fast ------------------------------------------------------------------------------------

def test_params_and_metrics_keep_the_names_of_metrics_json():
    assert flatten({"trainer": {"ema": {"decay": None}, "loggers": ["csv"]}, "seed": 1}) == {
        "trainer.ema.decay": None, "trainer.loggers": ["csv"], "seed": 1}
    record = {"epoch": 3, "stage": "head", "train_loss": 0.5, "val_acc": 0.75,
              "val_loss": float("nan"), "lr": {"head": 1e-3, "backbone": 1e-4}, "seconds": 2.0}
    assert epoch_metrics(record) == {"epoch": 3, "train_loss": 0.5, "val_acc": 0.75,
                                     "lr.head": 1e-3, "lr.backbone": 1e-4, "seconds": 2.0}


def test_tensorboard_is_the_default_and_csv_alone_writes_no_events(tmp_path):
    from transferlab.config.schema import TrainerConfig
    from transferlab.run.record import RunTracker

    assert TrainerConfig().loggers == ["tensorboard"]
    tracker = RunTracker(tmp_path, {"trainer": {"loggers": ["csv"]}}, {"seed": 0})
    for epoch, acc in ((1, 0.5), (2, 0.625)):
        tracker.log_epoch({"epoch": epoch, "stage": "head", "train_loss": 1.0 / epoch,
                           "train_acc": acc, "val_loss": 0.9 / epoch, "val_acc": acc,
                           "lr": {"head": 0.01}, "seconds": 0.1}, 0)
    tracker.finish("completed")
    assert not (tmp_path / "tb").exists()
    _assert_csv_equals_history(tmp_path)


def test_every_logger_of_the_schema_has_its_entry_and_no_more():
    from transferlab.config.schema import Logger
    from transferlab.run.trackers import TRACKERS

    assert list(TRACKERS) == Logger.values()


def test_a_process_that_does_not_write_opens_no_tracker(tmp_path):
    """Under DDP the record of every rank but 0 is kept in memory only (``writes=False``)."""
    from transferlab.run.record import RunTracker

    tracker = RunTracker(tmp_path, {"trainer": {"loggers": ["tensorboard", "csv"]}},
                         {"seed": 0}, writes=False)
    tracker.log_epoch({"epoch": 1, "stage": "head", "train_loss": 1.0, "train_acc": 0.5,
                       "val_loss": 1.0, "val_acc": 0.5, "lr": {"head": 0.01}, "seconds": 0.1}, 0)
    tracker.finish("completed")
    assert tracker.trackers == [] and list(tmp_path.iterdir()) == []


def test_an_unknown_logger_fails_at_composition():
    with pytest.raises(UserError, match=r"trainer\.loggers.*'mlfow'.*tensorboard, csv, mlflow"):
        compose_config(["trainer.loggers=[tensorboard,mlfow]"])


def test_a_missing_extra_is_one_line_naming_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: import fails
    trainer = {"loggers": ["mlflow"], "mlflow": {"tracking_uri": None, "experiment": "x"}}
    with pytest.raises(UserError) as err:
        open_trackers(tmp_path, {"trainer": trainer}, resumed=False)
    assert str(err.value) == ("trainer.loggers=mlflow needs mlflow, which is not installed: "
                              "pip install 'transferlab[mlflow]'")


# --- slow: real runs, a real MLflow store -----------------------------------------------------

@pytest.mark.slow
def test_a_store_that_cannot_be_opened_is_one_line_naming_it(tmp_path):
    (tmp_path / "blocker").write_text("a file where the store's folder would go")
    uri = f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}"
    trainer = {"loggers": ["mlflow"], "mlflow": {"tracking_uri": uri, "experiment": "x"}}
    with pytest.raises(UserError, match=r"^trainer\.loggers=mlflow: the tracking store "
                       rf"{uri} failed: .*File exists.*\(set it with trainer\.mlflow\."
                       r"tracking_uri or \$MLFLOW_TRACKING_URI\)$"):
        open_trackers(tmp_path / "run", {"trainer": trainer}, resumed=False)


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_parent_with_a_child_per_job(tmp_path):
    """4 jobs in 2 joblib workers (jobs in processes of their own), the store named by
    MLFLOW_TRACKING_URI: one parent run, 4 children whose metrics equal their metrics.json;
    the csv files and TensorBoard events are written beside."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = cli(["-m", *SMALL, "trainer.loggers=[tensorboard,csv,mlflow]", "seed=0,1,2,3",
                "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "name=trk"], tmp_path,
               MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps").glob("*/*_trk")
    parent = json.loads((sweep / ".mlflow_sweep.json").read_text())
    client = MlflowClient(uri)
    assert client.get_run(parent["run_id"]).info.status == "FINISHED"
    children = client.search_runs([parent["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert sorted(c.info.run_name for c in children) == [j.name for j in jobs]
    assert len(jobs) == 4
    for child in children:
        job = sweep / child.info.run_name
        assert json.loads((job / "trackers.json").read_text())["mlflow"]["run_id"] == \
            child.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.params["seed"] == job.name[-1]  # the composed config, flattened
        _assert_mlflow_equals_history(client, child.info.run_id, job)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "learning_curves.png" in artifacts
        table = client.download_artifacts(child.info.run_id, "text/summary/head.txt",
                                          str(tmp_path / child.info.run_name))
        assert "trainable" in Path(table).read_text()
        _assert_csv_equals_history(job)
        assert list((job / "tb").glob("events.out.tfevents.*"))


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``: a LevelDB-style log of 32 KiB
    blocks, each chunk a 7-byte header: crc, length, type; then W&B's protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the block's zero padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def _wandb_history(run_dir: Path) -> dict[int, dict]:
    """The rows W&B logged, by step, over every session of the run (offline run files)."""
    rows: dict[int, dict] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows[row["_step"]] = row
    return rows


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_and_wandb_runs(tmp_path, monkeypatch, one_thread):
    """A run of 1 epoch, resumed for a 2nd: one MLflow run (the key's store), its metrics
    equal metrics.json's 2 epochs; the W&B offline files hold both epochs under one id."""
    from mlflow.tracking import MlflowClient

    from transferlab.run import resume_run, train

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) go here
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*SMALL, "trainer.epochs=1", "trainer.loggers=[csv,mlflow,wandb]",
                 f"trainer.mlflow.tracking_uri={uri}", "trainer.mlflow.experiment=resumes"]
    run_dir = tmp_path / "run"
    train(compose_train(overrides), run_dir, overrides)
    first = json.loads((run_dir / "trackers.json").read_text())
    resume_run(run_dir, ["trainer.epochs=2"])
    state = json.loads((run_dir / "trackers.json").read_text())
    assert state == first
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resumes")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == state["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert [h["epoch"] for h in _history(run_dir)] == [1, 2]
    _assert_mlflow_equals_history(client, run.info.run_id, run_dir)
    _assert_csv_equals_history(run_dir)
    sessions = sorted(run_dir.glob("wandb/offline-run-*"))
    # offline-run-<time>-<id> (-1 when both sessions started in the same second)
    assert len(sessions) == 2 and all(f"-{state['wandb']['id']}" in p.name for p in sessions)
    logged = _wandb_history(run_dir)
    for epoch in _history(run_dir):
        for key, value in epoch_metrics(epoch).items():
            assert logged[epoch["epoch"]][key] == pytest.approx(value, rel=1e-12), key
