"""transferlab-rank: the ranked report from rows (fast), its command line's mistakes (fast),
and whole rankings of a small data set through the feature cache (slow): a second call does
not run the backbone, and an online backbone that cannot be fetched is one row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transferlab.cli.args import help_text
from transferlab.cli.rank import SPEC, main
from transferlab.tools.rank import Row, source_probs
from transferlab.tools.rank_report import (
    block_table,
    console_text,
    next_command,
    ranked_table,
    reading,
    report,
)
from transferlab.tools.scores import probe_accuracy
from transferlab.tools.unfreeze import fit_linear_head, relative_grad_norms


def _rows() -> list[Row]:
    return [
        Row("a", scores={"logme": 0.10, "leep": -0.5}, dim=8, seconds=1.0),
        Row("a", "stem", 0, scores={"logme": -0.4, "leep": None}, dim=4),
        Row("a", "b1", 1, scores={"logme": 0.30, "leep": None}, dim=6),
        Row("a", "head", 2, scores={"logme": 0.10, "leep": None}, dim=8),
        Row("offline_net", error="weights cannot be downloaded: copy them into the cache"),
        Row("c", scores={"logme": 0.25, "leep": -0.7}, dim=8, seconds=2.0),
        Row("b", scores={"logme": 0.20, "leep": None}, dim=8, seconds=2.0),
    ]


def test_backbones_ranked_by_the_first_score_with_the_gap_to_the_next():
    table = ranked_table(_rows(), ["logme", "leep"])
    assert table[0] == ["rank", "backbone", "logme", "leep", "gap (logme)", "dim", "seconds"]
    assert [line[:3] for line in table[1:4]] == [["1", "c", "0.2500"], ["2", "b", "0.2000"],
                                                 ["3", "a", "0.1000"]]
    assert table[1][4] == "0.0500" and table[2][4] == "0.1000" and table[3][4] == "n/a"
    assert table[2][3] == "n/a"  # no ImageNet head: no LEEP
    assert table[4] == ["-", "offline_net", "failed: weights cannot be downloaded: copy them "
                        "into the cache"]


def test_blocks_listed_input_to_output_with_their_rank():
    table = block_table(_rows(), "a", ["logme"])
    assert [line[1] for line in table[1:]] == ["stem", "b1", "head"]
    assert [line[3] for line in table[1:]] == ["3", "1", "2"]


def test_reading_names_the_blocks_after_the_peak():
    text = reading(_rows(), "a", "logme")
    assert "peaks after block 1 (b1" in text and "freeze=top_k freeze.k=1" in text
    assert "backbone.cut=1 (the features after block 1)" in text
    rows = [Row("x", "s", 0, scores={"logme": 0.1}), Row("x", "t", 1, scores={"logme": 0.2})]
    assert "highest after its last block (t)" in reading(rows, "x", "logme")
    assert reading(_rows(), "c", "logme") is None  # no blocks scored


def test_next_command_sweeps_the_top_two_that_were_scored():
    command = next_command(_rows(), "logme", ["dataset=hymenoptera", "dataset.image_size=224"])
    assert command == ("transferlab-train -m dataset=hymenoptera dataset.image_size=224 "
                       "backbone=c,b freeze=linear_probe,top_k")
    assert next_command([Row("x", error="no")], "logme", []) is None


def test_console_text_says_what_the_score_means_and_suggests_a_sweep_and_halving():
    text = console_text(report(_rows(), ["logme"], ["dataset=digits"]))
    assert text.splitlines()[0].startswith("ranked by logme on the training split")
    assert "failed: weights cannot be downloaded" in text
    assert text.splitlines()[-2:] == [
        "next: transferlab-train -m dataset=digits backbone=c,b freeze=linear_probe,top_k",
        "  or, stopping the weak ones early: transferlab-train -m hydra/sweeper=halving "
        "dataset=digits backbone=c,b freeze=linear_probe,top_k"]


@pytest.mark.slow  # importing scikit-learn takes a second or two
def test_probe_accuracy_separates_separable_from_random():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    separable = rng.normal(size=(60, 5)) + 4 * labels[:, None]
    assert probe_accuracy(separable, labels) > 0.95
    assert probe_accuracy(rng.normal(size=(60, 5)), labels) < 0.8


@pytest.mark.parametrize("argv, error", [
    (["scores=logme,lepe"], "error: invalid value for scores: 'logme,lepe': unknown score "
                            "'lepe' (did you mean 'leep', 'probe', 'logme'?); choose from logme, "
                            "leep, nce, h_score, h_score_shrinkage, transrate, probe"),
    (["backbone=resnet18"], "error: backbone=resnet18: transferlab-rank takes "
                            "backbones=<a,b,...> (one or more), not backbone="),
    (["backbone.cut=12"], "error: backbone.cut=12: transferlab-rank builds each of "
                          "backbones= as its preset and would not apply it; drop it (the block "
                          "rows score the features after every block, as backbone.cut would "
                          "give)"),
    (["--blocks"], "error: --blocks is not an option: write blocks=true"),
    (["blocks=false", "rgn_batches=2"], "error: rgn_batches=2 measures blocks: drop "
                                        "blocks=false, or rgn_batches="),
    (["blocks=maybe"], "error: invalid value for blocks: 'maybe': expected true/false "
                       "(or 1/0, yes/no)"),
    (["against=,"], "error: invalid value for against: ',': expected one name or more, "
                    "separated by commas"),
])
def test_mistakes_are_one_line_before_anything_is_built(argv, error, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [error]


def test_help_lists_the_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out == help_text(SPEC) + "\n" and "backbones=<a,b,...>" in out


# -- whole rankings (slow) -------------------------------------------------------------------
DIGITS = ["dataset=digits", "dataset.image_size=32", "dataset.samples_per_class=8",
          "trainer.num_workers=0", "trainer.device=cpu"]


@pytest.mark.slow
def test_rank_twice_the_second_from_the_cache_and_an_offline_backbone_is_one_row(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("transferlab.backbones.timm_zoo.host_reachable", lambda host: False)
    monkeypatch.setattr("transferlab.backbones.timm_zoo._hf_cached", lambda hub_id: False)
    cache = f"trainer.feature_cache.dir={tmp_path / 'cache'}"
    first = tmp_path / "first"
    argv = [*DIGITS, cache, "backbones=efficientnet_lite0,resnet10t", "scores=logme,leep",
            "against=none"]
    assert main([*argv, f"output={first}"]) == 1  # resnet10t failed, the rest came
    out = capsys.readouterr().out
    assert "failed: pretrained weights for timm model resnet10t" in out
    assert "efficientnet_lite0, after each block" in out
    saved = json.loads((first / "rank.json").read_text())
    assert (first / "rank.md").is_file() and (first / "rank.png").stat().st_size > 1000

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("the backbone ran on the images: the cache was not used")

    monkeypatch.setattr("transferlab.feature_cache.FeatureCache._extract", no_backbone_pass)
    monkeypatch.setattr("transferlab.tools.rank._block_pass", no_backbone_pass)
    second = tmp_path / "second"
    assert main([*DIGITS, cache, "backbones=efficientnet_lite0", "scores=logme,leep",
                 f"output={second}", "against=none"]) == 0
    again = json.loads((second / "rank.json").read_text())
    assert _same_scores(again["rows"], saved["rows"])  # the same features, the same scores
    whole = again["rows"][0]
    assert whole["block"] is None and whole["scores"]["leep"] < 0
    assert len(again["rows"]) == 1 + len(again["blocks"]["efficientnet_lite0"]) - 1


def _same_scores(got: list[dict], want: list[dict]) -> bool:
    want = {(r["backbone"], r["block"]): r["scores"] for r in want}
    return all(r["scores"] == pytest.approx(want[(r["backbone"], r["block"])]) for r in got)


# -- what to unfreeze: Auto-RGN ------------------------------------------------------------------
def _tiny_backbone():
    from torch import nn

    from transferlab.backbones.base import Backbone, Block, InputSpec

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU())
    return Backbone("tiny", module, [Block("conv0", ("0",)), Block("conv2", ("2",))],
                    InputSpec(8, (0.5,) * 3, (0.5,) * 3), pretrained=False, feature_shape=(6, 6, 6))


def test_relative_gradient_norm_is_grad_over_weight_norm_per_block():
    """Checked against the gradient of the same loss computed directly (rel. 1e-5); the
    backbone's requires_grad is put back as it was."""
    from torch.utils.data import TensorDataset

    backbone = _tiny_backbone()
    for p in backbone.module.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1] * 4)
    head = torch.nn.Linear(6, 2)
    ratios = relative_grad_norms(backbone, head, TensorDataset(x, y), batches=1, batch_size=8)
    assert all(not p.requires_grad and p.grad is None for p in backbone.module.parameters())

    module = backbone.module.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(head(module(x).mean(dim=(2, 3))), y)
    weights = [[module[0].weight, module[0].bias], [module[2].weight, module[2].bias]]
    grads = torch.autograd.grad(loss, [p for ps in weights for p in ps])
    for k, ps in enumerate(weights):
        g = torch.sqrt(sum(t.pow(2).sum() for t in grads[2 * k:2 * k + 2]))
        w = torch.sqrt(sum(p.pow(2).sum() for p in ps))
        assert ratios[k] == pytest.approx(float(g.detach() / w.detach()), rel=1e-5)


def test_linear_head_fits_separable_features():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    features = rng.normal(size=(60, 5)) + 5 * np.eye(5)[labels]
    head = fit_linear_head(features, labels)
    with torch.no_grad():
        predicted = head(torch.from_numpy(features).float()).argmax(1).numpy()
    assert (predicted == labels).mean() == 1.0


def test_reading_names_the_blocks_of_largest_relative_gradient_norm():
    rows = [Row("x", "s", 0, scores={"logme": 0.1}, rgn=0.02),
            Row("x", "t", 1, scores={"logme": 0.2}, rgn=0.05),
            Row("x", "u", 2, scores={"logme": 0.3}, rgn=0.01)]
    text = reading(rows, "x", "logme")
    assert "blocks 1 (t, 5.0e-02), 0 (s, 2.0e-02), 2 (u, 1.0e-02)" in text
    assert text.endswith("try freeze=surgical freeze.block=1")
    assert block_table(rows, "x", ["logme"])[0][-1] == "rgn"


def test_source_probabilities_from_pooled_features_only_when_the_head_averages():
    """A global-average head gives, from the pooled features, the probabilities it gives from
    the map (1e-5); a head that reads the map's layout (VGG's 7x7) gives none: LEEP is n/a."""
    from torch import nn

    backbone = _tiny_backbone()
    torch.manual_seed(1)
    maps = torch.randn(5, 6, 6, 6)
    backbone.imagenet_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                           nn.Linear(6, 10))
    probs = source_probs(backbone, maps.mean(dim=(2, 3)).numpy())
    with torch.no_grad():
        want = backbone.imagenet_head(maps).softmax(dim=1).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    backbone.imagenet_head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1),
                                           nn.Linear(24, 10))
    assert source_probs(backbone, maps.mean(dim=(2, 3)).numpy()) is None


# -- how the scores ranked the runs trained before -----------------------------------------------
def _past_run(root, name: str, dataset: str, backbone: dict, best: float | None,
              status: str = "completed") -> None:
    """A run directory as transferlab-train leaves it (the metrics.json contract)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    epoch = {"epoch": 1, "stage": "train", "val_loss": 0.5, "val_acc": best}
    (run / "metrics.json").write_text(json.dumps({
        "status": status, "history": [epoch] if best is not None else [],
        "best": epoch if best is not None else None, "final": epoch if best is not None else None,
        "params": {}, "hparams": {"dataset": dataset, **backbone}}))


def test_kendall_tau_and_the_pairs_in_order_agree_with_scipy():
    from scipy.stats import kendalltau

    from transferlab.tools.rank_history import kendall

    xs, ys = [0.1, 0.3, 0.2, 0.4], [0.90, 0.95, 0.97, 0.99]
    tau, agree, total = kendall(xs, ys)
    assert (agree, total) == (5, 6)  # only (0.3, 0.2) against (0.95, 0.97) is out of order
    assert tau == pytest.approx(kendalltau(xs, ys).statistic) == pytest.approx(4 / 6)
    assert kendall([0.1], [0.9]) == (None, 0, 0)
    assert kendall([0.1, 0.1], [0.9, 0.8])[0] is None  # a tie in the score: no untied pair


def test_runs_before_on_the_same_data_set_say_how_each_score_ranked_the_backbones(tmp_path):
    """Each backbone's best val acc over its completed runs on the data set; failed runs,
    other data sets and other backbones left out; tau per score over those backbones."""
    from transferlab.tools.rank_history import before, before_text

    past = tmp_path / "outputs"
    _past_run(past, "a1", "digits", {"backbone": "a"}, 0.90)
    _past_run(past, "a2", "digits", {"backbone": "a"}, 0.93)  # a's best
    _past_run(past, "b1", "digits", {"backbone": "timm", "backbone.name": "b"}, 0.97)
    _past_run(past, "c1", "digits", {"backbone": "c"}, 0.95)
    _past_run(past, "c2", "digits", {"backbone": "c"}, None, status="failed")
    _past_run(past, "c3", "hymenoptera", {"backbone": "c"}, 0.99)  # another data set
    _past_run(past, "z1", "digits", {"backbone": "z"}, 0.99)  # not a candidate
    found = before(_rows(), ["logme", "leep"], "digits", [past, tmp_path / "absent"])
    assert found.runs == 4
    assert found.accuracy == {"b": 0.97, "c": 0.95, "a": 0.93}
    # logme: c 0.25 > b 0.20 > a 0.10 against b > c > a: 2 of 3 pairs in order
    assert found.pairs["logme"] == (2, 3) and found.tau["logme"] == pytest.approx(1 / 3)
    # leep: a -0.5 > c -0.7 (b has none) against c > a: 0 of 1
    assert found.pairs["leep"] == (0, 1) and found.tau["leep"] == pytest.approx(-1.0)
    lines = before_text(found, [past])
    assert lines[0] == (f"before, on digits: 4 completed run(s) under {past} trained 3 of these "
                        "backbones (best val acc: b 0.9700, c 0.9500, a 0.9300)")
    assert lines[1] == "  logme ranked them with Kendall's tau +0.33 (2 of 3 pair(s) in order)"
    text = console_text(report(_rows(), ["logme", "leep"], ["dataset=digits"], lines))
    assert "\n".join(lines) in text
    assert before(_rows(), ["logme"], "mnist", [past]) is None  # no run on that data set
