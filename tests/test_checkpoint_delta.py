"""Checkpoints that hold only what changed (``trainer.checkpoint_weights=changed``): the
tensors still equal to the pretrained weights are left out, rebuilt from the backbone's
package on load and checked against their fingerprints.

The pretrained runs use EfficientNet-Lite0 from its pip package (offline) on digits at 32 px.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transferlab.backbones.source import read_weights
from transferlab.errors import UserError
from transferlab.infra.checkpoint import FORMAT, FORMAT_DELTA, load_checkpoint, read_state_dict
from transferlab.infra.delta import SourceChanged, WeightsSource, complete, fingerprint, split
from transferlab.tools.export import load_saved_model

from .conftest import cli
from .test_predict import save_digits
from .test_resume import assert_same_run, checkpoint_epoch, launch, run_cli, wait_for

LITE0 = ["dataset.image_size=32", "trainer.num_workers=0", "trainer.progress=false",
         "trainer.deterministic=true"]
LINEAR_PROBE = [*LITE0, "trainer.epochs=2"]  # the default run: freeze=linear_probe
TWO_STAGE = [*LITE0, "freeze=two_stage", "freeze.head_epochs=1", "freeze.finetune_epochs=2",
             "freeze.fine_tune_at=-1"]
SMALL = 300_000  # bytes: the head, its Adam state, the record; the backbone is 13.6 MB


def console(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A console script's module (``transferlab-eval`` -> transferlab.cli.evaluate)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"transferlab.cli.{script}", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def trained(root: Path, name: str, args: list[str]) -> Path:
    run_dir = root / name
    proc = cli([*args, f"hydra.run.dir={run_dir}"], root, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def delta_run(tmp_path_factory) -> Path:
    """The default run (a linear probe of pretrained EfficientNet-Lite0), 2 epochs."""
    return trained(tmp_path_factory.mktemp("delta"), "run", LINEAR_PROBE)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The same run with ``trainer.checkpoint_weights=full``: checkpoints as they always were."""
    return trained(tmp_path_factory.mktemp("full"), "run",
                   [*LINEAR_PROBE, "trainer.checkpoint_weights=full"])


# -- the mechanics, without training --------------------------------------------------------------

def test_split_leaves_out_equal_tensors_and_complete_puts_them_back():
    pretrained = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    source = WeightsSource({f"backbone.{k}": (k, fingerprint(t)) for k, t in pretrained.items()},
                           "a package")
    state = {"backbone.w": pretrained["w"].clone(), "backbone.b": torch.zeros(3),
             "head.w": torch.ones(2)}
    omitted: dict[str, list[str]] = {}
    kept = split(state, source.tensors, omitted)
    assert set(kept) == {"backbone.b", "head.w"} and set(omitted) == {"backbone.w"}
    full = complete(kept, source.record(omitted), pretrained, "x.pt")
    assert full.keys() == state.keys()
    assert all(torch.equal(full[k], state[k]) for k in state)
    assert full["backbone.w"] is not pretrained["w"]  # a copy: training it leaves the source

    changed = {**pretrained, "w": pretrained["w"] + 1e-6}
    with pytest.raises(SourceChanged, match="backbone.w was left out as equal to the "
                       "pretrained tensor w of a package") as err:
        complete(kept, source.record(omitted), changed, "x.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="'transferlab-source/9'"):
        complete(kept, {**source.record(omitted), "format": "transferlab-source/9"}, changed,
                 "x.pt")


def test_a_fingerprint_ignores_the_memory_format():
    t = torch.randn(2, 3, 4, 5)
    assert fingerprint(t) == fingerprint(t.to(memory_format=torch.channels_last))
    assert fingerprint(t) != fingerprint(t.double())


@pytest.mark.slow  # (a second or more: the fast tier stays under a minute)
def test_random_weights_are_stored_in_full(tiny_run):
    """A backbone with pretrained=false has no source to rebuild: every tensor is kept."""
    ckpt = load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    assert ckpt["format"] == FORMAT and "source" not in ckpt


# -- whole runs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_linear_probe_checkpoint_is_small_and_evaluates_to_its_val_acc(delta_run):
    for name in ("best", "last"):
        assert (delta_run / "checkpoints" / f"{name}.pt").stat().st_size < SMALL
    ckpt = load_checkpoint(delta_run / "checkpoints" / "best.pt")
    assert ckpt["format"] == FORMAT_DELTA
    assert set(ckpt["model"]) == {"head.2.weight", "head.2.bias"}  # the linear head only
    assert all(k.startswith("backbone.") for k in ckpt["source"]["tensors"])
    assert "efficientnet-lite0" in ckpt["source"]["weights"]

    proc = console("evaluate", f"run={delta_run}", "device=cpu", cwd=delta_run)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((delta_run / "eval.json").read_text())
    best = json.loads((delta_run / "metrics.json").read_text())["best"]
    assert report["epoch"] == best["epoch"]
    assert report["accuracy"] == pytest.approx(best["val_acc"], abs=1e-6)
    assert report["loss"] == pytest.approx(best["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_full_and_delta_checkpoints_rebuild_the_same_model(delta_run, full_run):
    """The same run saved both ways: the full checkpoint (as every earlier version wrote
    them) still evaluates, and both give the same model; backbone.init.path reads both."""
    full = full_run / "checkpoints" / "best.pt"
    assert full.stat().st_size > 10_000_000
    assert load_checkpoint(full)["format"] == FORMAT and "source" not in load_checkpoint(full)
    proc = console("evaluate", f"run={full_run}", "device=cpu", cwd=full_run)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((full_run / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(
        json.loads((full_run / "metrics.json").read_text())["best"]["val_acc"], abs=1e-6)

    a = load_saved_model(full).model.state_dict()
    b = load_saved_model(delta_run / "checkpoints" / "best.pt").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    on_disk = read_state_dict(full, option="backbone.init.path")
    rebuilt = read_weights(delta_run / "checkpoints" / "best.pt", option="backbone.init.path")
    assert on_disk.keys() == rebuilt.keys()
    assert all(torch.equal(on_disk[k], rebuilt[k]) for k in on_disk)


@pytest.mark.slow
def test_export_and_predict_work_on_a_delta_checkpoint(delta_run, tmp_path):
    out = tmp_path / "deploy"
    proc = console("export", f"run={delta_run}", f"output={out}", "format=torchscript",
                   "samples=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["verification"]["passed"] is True

    save_digits(tmp_path / "digits", 4)
    csv_path = tmp_path / "preds.csv"
    proc = console("predict", f"run={delta_run}", f"output={csv_path}", "device=cpu",
                   str(tmp_path / "digits"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(csv_path.read_text().splitlines()) == 1 + 4


@pytest.mark.slow
def test_a_changed_pretrained_tensor_is_refused_in_one_line(delta_run, monkeypatch):
    """Another version of the weights package: the rebuilt tensor's fingerprint differs."""
    import transferlab.run.saved as saved

    built = saved.build_backbone

    def other_version(cfg):
        backbone = built(cfg)
        with torch.no_grad():
            backbone.module.conv_stem.weight.add_(1e-3)
        return backbone

    monkeypatch.setattr(saved, "build_backbone", other_version)
    with pytest.raises(SourceChanged) as err:
        load_saved_model(delta_run / "checkpoints" / "best.pt")
    line = str(err.value)
    assert "\n" not in line
    assert "backbone.conv_stem.weight was left out as equal to the pretrained tensor" in line
    assert "the pretrained weights changed" in line and "install the version" in line


@pytest.mark.slow
def test_resume_from_a_delta_last_checkpoint_is_exact(tmp_path):
    reference = trained(tmp_path, "reference", TWO_STAGE)
    ckpt = load_checkpoint(reference / "checkpoints" / "last.pt")
    assert ckpt["format"] == FORMAT_DELTA and ckpt["source"]["tensors"]

    run_dir = tmp_path / "run"
    proc = launch([*TWO_STAGE, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (checkpoint_epoch(run_dir) or (0, False))[0] >= 2, proc)  # in stage 2
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert checkpoint_epoch(run_dir) == (2, False), "killed too late to test this"
    resumed = run_cli([f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, run_dir)
    after = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert after["source"] == ckpt["source"]  # the same tensors left out, the same values


@pytest.mark.slow
def test_the_ema_of_the_weights_is_stored_the_same_way(tmp_path, one_thread):
    from transferlab.run import train

    from .conftest import compose_train

    train(compose_train([*LITE0, "trainer.epochs=1", "trainer.ema.decay=0.9"]), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(ckpt["ema"]["model"]) == set(ckpt["model"]) == {"head.2.weight", "head.2.bias"}
    raw, ema = (load_saved_model(tmp_path / "checkpoints" / "last.pt", weights=w).model
                for w in ("raw", "ema"))
    assert torch.equal(raw.backbone.conv_stem.weight, ema.backbone.conv_stem.weight)
    assert not torch.equal(raw.head[2].weight, ema.head[2].weight)


@pytest.mark.slow
def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path, one_thread):
    """freeze=lora: the adapted layers' own weights (peft's ``base_layer``) are the pretrained
    ones, left out; a resume puts them back under those names."""
    from transferlab.run import resume_run, train

    from .conftest import compose_train

    lora = [*LITE0, "freeze=lora", "dataset.samples_per_class=10"]
    train(compose_train([*lora, "trainer.epochs=2"]), tmp_path / "reference")
    train(compose_train([*lora, "trainer.epochs=1"]), tmp_path / "run")
    resume_run(tmp_path / "run", ["trainer.epochs=2"])
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")
            for r in ("reference", "run"))
    assert {k.split(".")[0] for k in a["model"]} == {"backbone", "head"}
    assert all("lora_" in k for k in a["model"] if k.startswith("backbone."))
    assert any(".base_layer." in k for k in a["source"]["tensors"])
    assert a["model"].keys() == b["model"].keys() and a["source"] == b["source"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    load_saved_model(tmp_path / "run" / "checkpoints" / "last.pt")  # merged and checked
