"""``backbone.cut``: a backbone kept up to one block, its features that block's output."""

from __future__ import annotations

import json

import pytest
import torch

from transferlab.backbones import build_backbone, probe_features
from transferlab.backbones.segments import boundary_points, sequential_view
from transferlab.cli.evaluate import main as eval_main
from transferlab.config.schema import BackboneConfig
from transferlab.errors import UserError
from transferlab.run import train

from .conftest import TINY, TINY_SIZE


def _tiny(cut: str | None = None, name: str = "test_efficientnet"):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name=name, source="timm", pretrained=False,
                                             cut=cut))
    probe_features(backbone, TINY_SIZE)
    return backbone


def test_a_cut_backbone_is_the_whole_ones_prefix_up_to_the_block(one_thread):
    whole = _tiny()
    segments = sequential_view(whole, TINY_SIZE)
    points = boundary_points(whole, segments)
    assert [j for _, j, _ in points] == list(range(len(whole.blocks)))
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1))
    full = whole.module.state_dict()
    whole.module.eval()
    for cut, j, name in points[:-1]:
        part = _tiny(str(j))
        assert [b.name for b in part.blocks] == [b.name for b in whole.blocks[:j + 1]]
        assert part.imagenet_head is None and part.categories is None
        state = part.module.state_dict()
        # the same names (checkpoints, blocks and freeze policies read them) and weights
        assert set(state) < set(full)  # a strict subset: the later blocks are gone
        assert all(torch.equal(full[k], v) for k, v in state.items())
        part.module.eval()
        expected = x
        with torch.no_grad():
            for seg in segments[:cut]:
                expected = seg.fn(expected)
            got = part.module(x)
        # the features transferlab-rank scores at this block, unpooled
        assert torch.equal(got, expected), name
        assert part.feature_shape == tuple(expected.shape[1:])
    by_name = _tiny(points[1][2])  # a block named, not numbered: the same cut
    assert set(by_name.module.state_dict()) == set(_tiny("1").module.state_dict())
    last = _tiny(str(len(whole.blocks) - 1))  # after the last block: the whole backbone
    assert set(last.module.state_dict()) == set(full)


@pytest.mark.parametrize("cut, needle", [
    ("99", "has no such block; name one of its"),
    ("conv_head", "has no such block"),
])
def test_a_cut_that_names_no_block_is_one_line(cut, needle, one_thread):
    with pytest.raises(UserError, match=needle) as info:
        _tiny(cut)
    assert "\n" not in str(info.value) and "transferlab-blocks lists them" in str(info.value)


def test_a_backbone_without_a_block_view_cannot_be_cut(one_thread):
    with pytest.raises(UserError, match="cannot be cut there: it has no block-by-block view"):
        _tiny("1", name="test_vit")


@pytest.mark.slow
def test_a_cut_run_trains_saves_and_evaluates_as_recorded(compose_cfg, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    train(compose_cfg([*TINY, "backbone.cut=3", "freeze=two_stage", "freeze.head_epochs=1",
                       "freeze.finetune_epochs=1", "freeze.fine_tune_at=2"]), run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["stage"] for e in metrics["history"]] == ["head", "finetune"]
    assert eval_main([f"run={run_dir}"]) == 0  # the saved config builds the same cut backbone
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["best"]["val_acc"], abs=1e-6)
    with pytest.raises(UserError, match="freeze.block=5 is out of range: the backbone has 4"):
        train(compose_cfg([*TINY, "backbone.cut=3", "freeze=surgical", "freeze.block=5"]),
              tmp_path / "bad")
