"""hydra/launcher=ray_tasks: a sweep on a local Ray (2 CPUs, started by the sweep) gives, job
for job, the numbers of the same sweep on Hydra's basic launcher (pip install
'transferlab[ray]')."""

from __future__ import annotations

import importlib.util
import json

import pytest

from .conftest import TINY, cli

RAY = importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None


@pytest.mark.slow
@pytest.mark.skipif(not RAY, reason="hydra-ray-launcher is not installed: pip install "
                    "'transferlab[ray]'")
def test_a_ray_sweep_matches_the_basic_launcher_job_for_job(tmp_path):
    sweep = ["-m", *TINY, "dataset.val_fraction=0.25", "seed=0,1", "optimizer.lr=0.01",
             "trainer.feature_cache.mode=off"]  # each job computes its own numbers
    results = {}
    ray = ["hydra/launcher=ray_tasks", "hydra.launcher.ray.init.num_cpus=2"]
    for launcher, extra in (("ray", ray), ("basic", [])):
        cwd = tmp_path / launcher
        cwd.mkdir()
        # Ray runs a job of remote.num_cpus=1 on one thread (it sets OMP_NUM_THREADS): the
        # basic launcher's jobs too, so that their float sums add up in the same order
        proc = cli([*sweep, *extra], cwd, OMP_NUM_THREADS="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 job(s), 0 failed" in proc.stdout
        jobs = sorted(cwd.glob("outputs/sweeps/*/*/*_seed-*"))
        records = [json.loads((job / "metrics.json").read_text()) for job in jobs]
        results[launcher] = {
            job.name: [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in r["history"]]
            for job, r in zip(jobs, records, strict=True)}
        results[launcher + " pids"] = {r["pid"] for r in records}
    assert list(results["ray"]) == ["0_seed-0", "1_seed-1"]
    assert results["ray"] == results["basic"]
    assert results["ray"]["0_seed-0"] != results["ray"]["1_seed-1"]  # the seeds differ
    assert len(results["ray pids"]) == 2  # two Ray workers, one job each


@pytest.mark.slow  # a process of its own (Hydra composes the launcher in its multirun)
@pytest.mark.skipif(RAY, reason="the plugin is installed")
def test_without_the_plugin_the_preset_is_one_line_naming_the_extra(tmp_path):
    proc = cli(["-m", "hydra/launcher=ray_tasks", "seed=0,1"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: hydra/launcher=ray_tasks needs a Hydra plugin that is not installed "
        "(hydra/launcher/ray could not be loaded): pip install 'transferlab[ray]'"]
