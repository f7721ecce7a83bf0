"""``transferlab-soup`` (:mod:`transferlab.tools.soup`): uniform and greedy soups of real tiny
runs, the runs left out, and the soup's run directory read by ``transferlab-eval``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from transferlab.cli.evaluate import main as eval_main
from transferlab.cli.soup import main as soup_main
from transferlab.infra.checkpoint import load_checkpoint, write_sealed
from transferlab.run import train
from transferlab.tools.soup import average

from .conftest import TINY, compose_train

# every member shares the seed: the tiny backbone is random and frozen, drawn by the seed, so
# only runs of one seed share their starting weights (as fine-tuned runs share a pretrained
# backbone)
# (200 training images: quick runs; the val and test splits stay whole)
COMMON = [*TINY, "dataset.test_fraction=0.1", "dataset.samples_per_class=20"]


def test_val_and_train_are_refused_as_held_out_splits(tmp_path, capsys):
    for split, why in (("val", "reported on"), ("train", "trained on the train split"),
                       ("fold:1/5", "not held out")):
        assert soup_main([f"sweep={tmp_path}", "method=greedy", f"held_out={split}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: invalid value for held_out: '{split}'") and why in err
        assert len(err.splitlines()) == 1
    assert soup_main([f"sweep={tmp_path}", "method=greedy"]) == 2
    assert "held_out=test" in capsys.readouterr().err


def test_average_means_floats_and_takes_the_first_members_counters():
    a = {"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([1.0]),
         "bn.num_batches_tracked": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 5.0]), "bn.running_var": torch.tensor([4.0]),
         "bn.num_batches_tracked": torch.tensor(9)}
    soup = average([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 3.5]))
    assert torch.equal(soup["bn.running_var"], torch.tensor([2.5]))
    assert soup["bn.num_batches_tracked"].item() == 7
    assert soup["bn.num_batches_tracked"].dtype == torch.int64


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real tiny runs of one seed: two learning rates, and an mlp head (another
    architecture)."""
    root = tmp_path_factory.mktemp("soup_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, over in (("0_lr0.03", ["trainer.epochs=2", "optimizer.lr=0.03"]),
                           ("1_lr0.01", ["trainer.epochs=2", "optimizer.lr=0.01"]),
                           ("3_mlp", ["head=mlp"])):
            train(compose_train([*COMMON, *over]), root / name)
    finally:
        torch.set_num_threads(threads)
    return root


def sweep_of(runs, tmp_path, names):
    sweep = tmp_path / "sweep"
    for name in names:
        shutil.copytree(runs / name, sweep / name)
    return sweep


def model_of(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]


@pytest.mark.slow
def test_a_uniform_soup_is_the_mean_of_its_runs_and_transferlab_eval_reads_it(runs, tmp_path,
                                                                              capsys):
    sweep = sweep_of(runs, tmp_path, ["0_lr0.03", "1_lr0.01"])
    assert soup_main([f"sweep={sweep}", "method=uniform", f"output={tmp_path / 'soup'}"]) == 0
    soup = model_of(tmp_path / "soup")
    a, b = model_of(sweep / "0_lr0.03"), model_of(sweep / "1_lr0.01")
    assert set(soup) == set(a)
    moved = 0
    for name, tensor in soup.items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, (a[name] + b[name]) / 2), name
            moved += not torch.equal(a[name], b[name])
        else:
            assert torch.equal(tensor, a[name]), name
    assert moved > 0  # the runs differ: the mean is not either of them
    record = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert [m["in_soup"] for m in record["members"]] == [True, True]
    assert eval_main([f"run={tmp_path / 'soup'}"]) == 0
    evaluated = json.loads((tmp_path / "soup" / "eval.json").read_text())
    metrics = json.loads((tmp_path / "soup" / "metrics.json").read_text())
    assert evaluated["accuracy"] == metrics["best"]["val_acc"] == record["soup"]["val"]["accuracy"]
    assert evaluated["samples"] == 360


def poisoned_copy(source, target):
    """A copy of a run whose head is randomly initialised at a scale that swamps any head it
    is averaged with: a member a greedy soup must reject."""
    shutil.copytree(source, target)
    path = target / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(path)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in ckpt["model"].items():
        if name.startswith("head."):
            ckpt["model"][name] = 100 * torch.randn(tensor.shape, generator=generator)
    write_sealed(path, ckpt)


@pytest.mark.slow
def test_greedy_adds_a_run_only_when_the_held_out_accuracy_improves(runs, tmp_path, capsys):
    sweep = sweep_of(runs, tmp_path, ["0_lr0.03", "1_lr0.01", "3_mlp"])
    poisoned_copy(runs / "0_lr0.03", sweep / "2_random_head")
    shutil.copytree(runs / "1_lr0.01", sweep / "4_no_checkpoint",
                    ignore=shutil.ignore_patterns("checkpoints"))  # its record alone
    assert soup_main([f"sweep={sweep}", "method=greedy", "held_out=test"]) == 0
    out = capsys.readouterr().out
    assert "left out 3_mlp: head.name is 'mlp', not 'linear'" in out
    record = json.loads((sweep / "soup_greedy" / "soup.json").read_text())
    assert [item["run"] for item in record["left_out"]] == [str(sweep / "4_no_checkpoint"),
                                                            str(sweep / "3_mlp")]
    assert "left out 4_no_checkpoint: no checkpoints/best.pt" in out
    members = {m["run"]: m for m in record["members"]}
    poisoned = members[str(sweep / "2_random_head")]
    assert not poisoned["in_soup"]
    steps = record["steps"]
    assert steps[0]["run"] == max(record["members"], key=lambda m: (
        m["measure"]["accuracy"], -m["measure"]["loss"]))["run"]
    current = steps[0]["measure"]
    for step in steps[1:]:  # added exactly when the held-out measure improves
        better = (step["measure"]["accuracy"], -step["measure"]["loss"]) > (
            current["accuracy"], -current["loss"])
        assert step["added"] == better, step
        assert members[step["run"]]["in_soup"] == better
        current = step["measure"] if better else current
    rejected = next(s for s in steps if s["run"] == poisoned["run"])
    assert rejected["measure"]["accuracy"] < steps[0]["measure"]["accuracy"]
    # the soup written is the one measured: transferlab-eval on the held-out split agrees
    assert record["soup"]["test"] == current
    assert eval_main([f"run={sweep / 'soup_greedy'}", "split=test"]) == 0
    evaluated = json.loads((sweep / "soup_greedy" / "eval.json").read_text())
    assert evaluated["accuracy"] == current["accuracy"]
    assert evaluated["loss"] == pytest.approx(current["loss"], rel=1e-5)
