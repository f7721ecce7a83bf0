"""transferlab-rank: the ranked report from rows (fast), its command line's mistakes (fast),
and whole rankings of a small data set through the feature cache (slow): a second call does
not run the backbone, and an online backbone that cannot be fetched is one row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferlab.cli.args import help_text
from transferlab.cli.rank import SPEC, main
from transferlab.tools.rank import Row
from transferlab.tools.rank_report import (
    block_table,
    console_text,
    next_command,
    ranked_table,
    reading,
    report,
)
from transferlab.tools.scores import probe_accuracy


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
    rows = [Row("x", "s", 0, scores={"logme": 0.1}), Row("x", "t", 1, scores={"logme": 0.2})]
    assert "highest after its last block (t)" in reading(rows, "x", "logme")
    assert reading(_rows(), "c", "logme") is None  # no blocks scored


def test_next_command_sweeps_the_top_two_that_were_scored():
    command = next_command(_rows(), "logme", ["dataset=hymenoptera", "dataset.image_size=224"])
    assert command == ("transferlab-train -m dataset=hymenoptera dataset.image_size=224 "
                       "backbone=c,b freeze=linear_probe,top_k")
    assert next_command([Row("x", error="no")], "logme", []) is None


def test_console_text_says_what_the_score_means_and_mentions_halving_as_future():
    text = console_text(report(_rows(), ["logme"], ["dataset=digits"]))
    assert text.splitlines()[0].startswith("ranked by logme on the training split")
    assert "failed: weights cannot be downloaded" in text
    assert "next: transferlab-train -m dataset=digits backbone=c,b" in text
    assert "when the halving sweeper (hydra/sweeper=halving) is available" in text


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
                            "leep, nce, h_score, transrate, probe"),
    (["backbone=resnet18"], "error: backbone=resnet18: transferlab-rank takes "
                            "backbones=<a,b,...> (one or more), not backbone="),
    (["--blocks"], "error: --blocks is not an option: write blocks=true"),
    (["blocks=maybe"], "error: invalid value for blocks: 'maybe': expected true/false "
                       "(or 1/0, yes/no)"),
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
    argv = [*DIGITS, cache, "backbones=efficientnet_lite0,resnet10t", "scores=logme,leep"]
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
                 f"output={second}"]) == 0
    again = json.loads((second / "rank.json").read_text())
    assert _same_scores(again["rows"], saved["rows"])  # the same features, the same scores
    whole = again["rows"][0]
    assert whole["block"] is None and whole["scores"]["leep"] < 0
    assert len(again["rows"]) == 1 + len(again["blocks"]["efficientnet_lite0"]) - 1


def _same_scores(got: list[dict], want: list[dict]) -> bool:
    want = {(r["backbone"], r["block"]): r["scores"] for r in want}
    return all(r["scores"] == pytest.approx(want[(r["backbone"], r["block"])]) for r in got)
