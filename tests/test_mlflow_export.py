"""transferlab-export of a run that logged to MLflow: the exported files become artifacts of that
MLflow run (a real SQLite store, queried back through MLflow's client)."""

from __future__ import annotations

import json

import pytest

from transferlab.cli import export as export_cli

from .conftest import TINY, compose_train


@pytest.mark.slow
def test_the_export_is_logged_to_the_runs_mlflow_run(tmp_path, monkeypatch, capsys, one_thread):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from transferlab.run import train

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) go here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*TINY, "dataset.samples_per_class=8", "trainer.loggers=[mlflow]",
                 f"trainer.mlflow.tracking_uri={uri}", "trainer.mlflow.experiment=exports"]
    run_dir = tmp_path / "run"
    train(compose_train(overrides), run_dir, overrides)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]

    assert export_cli.main([f"run={run_dir}", "format=torchscript", "samples=4"]) == 0
    out = capsys.readouterr().out
    assert f"Logged to mlflow: runs:/{run_id}/export ({uri})" in out

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exports").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    logged = {a.path: a.file_size for a in client.list_artifacts(run_id, "export")}
    local = {f"export/{p.name}": p.stat().st_size for p in (run_dir / "export").iterdir()}
    assert logged == local and set(local) == {"export/model.ts", "export/preprocessing.json"}
    fetched = client.download_artifacts(run_id, "export/model.ts", str(tmp_path / "back"))
    assert open(fetched, "rb").read() == (run_dir / "export" / "model.ts").read_bytes()
