"""``transferlab-eval``: a saved checkpoint re-evaluated reproduces what the run recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from transferlab.cli.evaluate import main
from transferlab.run import train
from transferlab.tools.evaluate import EVAL_JSON, EVAL_PNG

from .conftest import TINY, compose_train

pytestmark = pytest.mark.slow  # trains a run to evaluate

VAL_SIZE = 360  # digits: 1797 images, val_fraction=0.2 stratified


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """Tiny models run fastest on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_metrics(tiny_run):
    """The session's 2-epoch tiny run (a copy: conftest's ``tiny_run``) and its metrics.json."""
    return tiny_run, json.loads((tiny_run / "metrics.json").read_text())


def evaluate(run_dir, *args: str) -> dict:
    assert main([f"run={run_dir}", *args]) == 0
    return json.loads((run_dir / EVAL_JSON).read_text())


def test_best_checkpoint_on_val_reproduces_the_recorded_val_acc(tiny_metrics, capsys):
    run_dir, metrics = tiny_metrics
    report = evaluate(run_dir)  # checkpoint=best split=val by default

    assert report["checkpoint"] == "best" and report["split"] == "val"
    assert report["epoch"] == metrics["best"]["epoch"]
    assert report["accuracy"] == pytest.approx(metrics["best"]["val_acc"], abs=1e-6)
    assert report["loss"] == pytest.approx(metrics["best"]["val_loss"], abs=1e-4)
    assert report["samples"] == VAL_SIZE
    assert sum(m["support"] for m in report["per_class"].values()) == VAL_SIZE
    assert list(report["per_class"]) == [str(d) for d in range(10)]
    matrix = report["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == VAL_SIZE
    trace = sum(matrix[i][i] for i in range(10))
    assert trace / VAL_SIZE == pytest.approx(report["accuracy"], abs=1e-12)
    for i, name in enumerate(report["classes"]):
        assert sum(matrix[i]) == report["per_class"][name]["support"]

    assert (run_dir / EVAL_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"accuracy {report['accuracy']:.4f}" in out and "precision" in out
    assert str(run_dir / EVAL_JSON) in out and str(run_dir / EVAL_PNG) in out

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert "eval/val/confusion_matrix" in events.Tags()["images"]
    assert events.Scalars("eval/val/acc")[-1].step == report["epoch"]


def test_last_checkpoint_reproduces_the_final_val_acc(tiny_metrics):
    run_dir, metrics = tiny_metrics
    report = evaluate(run_dir, "checkpoint=last", "split=val")
    assert report["checkpoint"] == "last" and report["epoch"] == metrics["final"]["epoch"] == 2
    assert report["checkpoint_path"] == str(run_dir / "checkpoints" / "last.pt")
    assert report["accuracy"] == pytest.approx(metrics["final"]["val_acc"], abs=1e-6)
    best = evaluate(run_dir, "checkpoint=best")  # best.pt: the best epoch's own weights
    assert best["checkpoint_path"] == str(run_dir / "checkpoints" / "best.pt")
    assert best["epoch"] == metrics["best"]["epoch"] <= report["epoch"]
    assert best["accuracy"] == pytest.approx(metrics["best"]["val_acc"], abs=1e-6)


def test_dataset_overrides_change_the_split(tiny_metrics):
    run_dir, _ = tiny_metrics
    report = evaluate(run_dir, "dataset.val_fraction=0.1")
    assert report["dataset_overrides"] == {"val_fraction": 0.1}
    assert report["samples"] == 180


@pytest.mark.parametrize("args, needle", [
    (["checkpoint=worst"], "invalid value for checkpoint: 'worst'"),
    (["split=tset"], "did you mean 'test'"),
    (["split=test"], "has no test split"),
    (["dataset.val_fractoin=0.1"], "unknown key dataset.val_fractoin"),
    (["chekpoint=last"], "unknown key 'chekpoint'"),
    (["last"], "expected key=value"),
    (["--checkpoint", "last"], "--checkpoint is not an option: write checkpoint=<value>"),
])
def test_user_errors_are_one_line(tiny_metrics, capsys, args, needle):
    run_dir, _ = tiny_metrics
    assert main([f"run={run_dir}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_run_without_checkpoints(tmp_path, capsys):
    assert main([f"run={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint best.pt" in err and "the run saved none (no epoch finished)" in err
    (tmp_path / "metrics.json").write_text(json.dumps({"history": [{"epoch": 1}]}))
    assert main([f"run={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"error: no checkpoint best.pt in {tmp_path / 'checkpoints'}: none is left, though "
        "metrics.json records 1 finished epoch(s) (deleted or moved?)\n")


@pytest.mark.slow  # a process of its own
def test_missing_run_dir_is_one_error_line_in_a_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_SWE")}
    proc = subprocess.run([sys.executable, "-m", "transferlab.cli.evaluate",
                           f"run={tmp_path}/nope"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: run directory {tmp_path}/nope does not exist"]
    assert "Traceback" not in proc.stderr


def test_a_logreg_run_says_what_it_is(tmp_path, capsys):
    run_dir = tmp_path / "logreg"
    overrides = [*TINY, "task=logreg", "dataset.samples_per_class=10"]
    overrides.remove("trainer.epochs=1")  # task=logreg uses no epochs: an error to give any
    train(compose_train(overrides), run_dir)
    assert main([f"run={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run_dir} is a task=logreg run") and "\n" not in err


def test_a_checkpoint_that_is_not_a_dict_is_one_line(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir(parents=True)
    torch.save(torch.zeros(3), tmp_path / "checkpoints" / "best.pt")
    assert main([f"run={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a Tensor, not a dict" in err and "\n" not in err and "Traceback" not in err


def test_the_runs_predictions_are_best_pts_and_eval_writes_its_own(tiny_metrics, capsys):
    from transferlab.run.predictions import EVAL_PREDICTIONS, load_predictions

    run_dir, metrics = tiny_metrics
    own = load_predictions(run_dir / "predictions_val.npz")
    assert own.header["epoch"] == metrics["best"]["epoch"] and own.header["split"] == "val"
    assert own.accuracy == pytest.approx(metrics["best"]["val_acc"], abs=1e-12)
    assert own.loss == pytest.approx(metrics["best"]["val_loss"], abs=1e-4)
    assert metrics["predictions"]["val"]["accuracy"] == own.accuracy
    assert own.header["identity"] == metrics_identity(run_dir)
    report = evaluate(run_dir)
    assert str(run_dir / EVAL_PREDICTIONS) in capsys.readouterr().out
    again = load_predictions(run_dir / EVAL_PREDICTIONS)
    assert again.accuracy == report["accuracy"]
    assert again.header["identity"] == own.header["identity"]
    assert (again.targets == own.targets).all() and (again.predicted == own.predicted).all()
    assert again.label_prob == pytest.approx(own.label_prob, abs=1e-4)
    assert ((again.label_prob > 0) & (again.label_prob <= 1)).all()
    flip = evaluate(run_dir, "tta=flip")
    tta = load_predictions(run_dir / EVAL_PREDICTIONS)
    assert tta.header["tta"] == "flip" and tta.accuracy == flip["accuracy"]
    assert (run_dir / "predictions_val.npz").stat().st_size < 20_000  # 360 images


def test_output_writes_an_evaluation_elsewhere_and_keeps_the_runs(tiny_metrics, tmp_path,
                                                                  capsys):
    """``output=<dir>``: every file of the evaluation (and its TensorBoard records) goes there;
    the run directory's own evaluation is left as it was."""
    from transferlab.run.predictions import EVAL_PREDICTIONS, load_predictions

    run_dir, _ = tiny_metrics
    plain = evaluate(run_dir)
    kept = {name: (run_dir / name).read_bytes() for name in (EVAL_JSON, EVAL_PREDICTIONS)}
    capsys.readouterr()
    out = tmp_path / "flip" / "eval"  # (made, parents too)
    assert main([f"run={run_dir}", "tta=flip", f"output={out}"]) == 0
    printed = capsys.readouterr().out
    assert f"Metrics saved to: {out / EVAL_JSON}" in printed and str(run_dir) not in printed
    flip = json.loads((out / EVAL_JSON).read_text())
    assert flip["tta"] == "flip" and flip["run"] == str(run_dir) and plain["tta"] == "none"
    assert load_predictions(out / EVAL_PREDICTIONS).header["tta"] == "flip"
    assert (out / EVAL_PNG).is_file() and list((out / "tb").glob("events.out.tfevents.*"))
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept

    (tmp_path / "a_file").write_text("")
    assert main([f"run={run_dir}", f"output={tmp_path / 'a_file' / 'eval'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: output={tmp_path / 'a_file' / 'eval'}: cannot make the folder")
    assert "\n" not in err


def metrics_identity(run_dir) -> str:
    """The val split's identity in the run's data fingerprint (its last checkpoint)."""
    from transferlab.infra.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["loop"]["data"]["identity"]["val"]
