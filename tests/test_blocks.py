"""transferlab-blocks: a backbone's blocks as freeze policies select them, without a run and
without its weights (nothing downloaded)."""

from __future__ import annotations

import re

import pytest

from transferlab.backbones import build_backbone
from transferlab.cli.blocks import main
from transferlab.config import BackboneConfig, compose_config, load_config
from transferlab.tools.blocks import block_rows


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME and Hugging Face cache, and every download fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))


def rows_of(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+-\d+\s", line)]


def test_the_blocks_of_a_timm_model_are_the_ones_a_policy_selects(capsys, offline):
    assert main(["backbone=test_efficientnet", "backbone_source=timm"]) == 0
    out = capsys.readouterr().out
    backbone = build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                             pretrained=False))
    rows = rows_of(out)
    names = [b.name for b in backbone.blocks]
    assert [r[2] for r in rows] == names
    assert [(int(r[0]), int(r[1])) for r in rows] == [(i, i - len(names))
                                                      for i in range(len(names))]
    counts = [int(r[3].replace(",", "")) for r in rows]
    assert counts == [r[3] for r in block_rows(backbone)]
    total = sum(p.numel() for p in backbone.module.parameters())
    assert sum(counts) == total and f"{total:,} parameters" in out.splitlines()[0]
    # blocks[-2:] names what the table's last two rows are
    assert f"blocks[-2:] is the last two ({names[-2]}, {names[-1]})" in out


def test_a_preset_lists_its_blocks_offline_with_the_names_of_the_stage_table(capsys, offline):
    """The default backbone's preset: its 18 blocks, from the architecture (no weights read)."""
    assert main(["backbone=efficientnet_lite0"]) == 0
    rows = rows_of(capsys.readouterr().out)
    preset = load_config(compose_config(["backbone=efficientnet_lite0"])).backbone
    assert preset.pretrained  # the preset's weights are not needed to name its blocks
    assert len(rows) == 18 and rows[0][2] == "stem" and rows[-1][2] == "conv_head+bn2"
    assert main(["backbone=resnet18"]) == 0  # torchvision, no download
    assert [r[2] for r in rows_of(capsys.readouterr().out)] == ["stem", "layer1", "layer2",
                                                                "layer3", "layer4"]


@pytest.mark.parametrize(("argv", "needle"), [
    ([], "backbone=<name> is required"),
    (["backbone=resnt"], "did you mean 'resnet50'"),
    (["backbone=resnet18", "backbone.widht=3"], "unknown key backbone.widht"),
])
def test_mistakes_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
