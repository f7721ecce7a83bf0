"""Bring your own weights: partial restore (backbone.init.*) and backbone.weights_path."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from transferlab.backbones import build_backbone
from transferlab.backbones.init import format_report, report_summary, restore_into
from transferlab.config import BackboneConfig, InitConfig, TorchvisionBackboneConfig
from transferlab.errors import UserError
from transferlab.run import train

from .conftest import TINY, compose_train


def tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                         pretrained=False))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def randomised(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Other values of the same shapes and dtypes (buffers included)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(v.shape, generator=gen) + 0.5).to(v.dtype) if v.is_floating_point()
            else v + 7 for k, v in state.items()}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)))
        self.fc = nn.Linear(4, 2)


def small_file() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    src = Small()
    with torch.no_grad():
        src.body.bn.running_mean.uniform_()
    state = {k.removeprefix("body."): v for k, v in src.state_dict().items()}
    state["classifier.weight"] = state.pop("fc.weight")
    state["classifier.bias"] = state.pop("fc.bias")
    return state


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def assert_one_line(err, *parts):
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


# -- mapping and copying -------------------------------------------------------------------------

def test_encoder_only_restore_leaves_everything_else_bit_identical(tmp_path):
    backbone = tiny_backbone()
    before = snapshot(backbone.module)
    encoder = randomised(before)
    file = {f"encoder.{k}": v for k, v in encoder.items()}
    file.update({f"decoder.layer{i}.weight": torch.randn(3, 3) for i in range(3)})
    file["decoder.conv_stem.weight"] = torch.randn(2)  # would clash if it were selected
    path = save(file, tmp_path / "autoencoder.pt")

    init = InitConfig(path=path, include=["encoder.*"], exclude=["encoder.conv_head.*",
                                                                 "encoder.bn2.*"],
                      strip_prefix="encoder.")
    report = restore_into(backbone.module, init)

    kept = [k for k in before if k.startswith(("conv_head.", "bn2."))]
    after = backbone.module.state_dict()
    for name, value in after.items():
        if name in kept:
            assert torch.equal(value, before[name]) and value.dtype == before[name].dtype, name
        else:
            assert torch.equal(value, encoder[name]), name
    assert len(report.loaded) == len(before) - len(kept)
    assert sorted(report.missing) == sorted(kept) and kept
    assert report.unexpected == [] and report.skipped == []
    assert report.file_tensors == len(file) and report.selected == len(report.loaded)
    assert ("encoder.bn1.running_mean", "bn1.running_mean") in report.loaded  # buffers too
    table = format_report(report)
    assert table.splitlines()[0].startswith("backbone.init from autoencoder.pt")
    assert "... and" in table and "<- encoder.conv_stem.weight" in table
    summary = report_summary(report)
    assert summary == {"path": path, "loaded": len(report.loaded), "missing": len(kept),
                       "unexpected": 0, "skipped": 0, "skipped_names": []}


def test_include_exclude_add_prefix_and_rename(tmp_path):
    module = Small()
    before = snapshot(module)
    file = small_file()
    path = save(file, tmp_path / "small.pth")
    init = InitConfig(path=path, include=["stem.*", "bn.*"], exclude=["*.num_batches_tracked"],
                      add_prefix="body.", rename={"classifier.weight": "fc.weight"})
    report = restore_into(module, init)
    loaded = dict(report.loaded)
    assert loaded["classifier.weight"] == "fc.weight"  # rename: no prefix, outside the globs
    assert loaded["bn.running_mean"] == "body.bn.running_mean"
    assert set(report.missing) == {"body.bn.num_batches_tracked", "fc.bias"}
    after = module.state_dict()
    for src, dst in report.loaded:
        assert torch.equal(after[dst], file[src]), dst
    for name in report.missing:
        assert torch.equal(after[name], before[name])

    # Without include everything is selected; what fits no backbone name is "unexpected".
    report = restore_into(Small(), InitConfig(path=path, add_prefix="body."))
    assert sorted(dst for _, dst in report.unexpected) == ["body.classifier.bias",
                                                           "body.classifier.weight"]
    assert "unexpected" in format_report(report)


def test_mapping_mistakes_are_one_line_errors(tmp_path):
    path = save(small_file(), tmp_path / "small.pth")
    with pytest.raises(UserError) as err:
        restore_into(Small(), InitConfig(path=path, rename={"classifer.weight": "fc.weight"}))
    assert_one_line(err, "backbone.init.rename", "classifer.weight", "classifier.weight")
    with pytest.raises(UserError) as err:  # two file names onto one backbone name
        restore_into(Small(), InitConfig(path=path, add_prefix="body.",
                                         rename={"classifier.bias": "body.stem.bias"}))
    assert_one_line(err, "body.stem.bias", "both map to")


def test_shape_mismatch_is_skipped_and_reported_or_an_error_when_strict(tmp_path):
    file = small_file()
    file["classifier.weight"] = torch.randn(3, 4)  # a 3-class head onto a 2-class one
    path = save(file, tmp_path / "small.pth")
    rename = {"classifier.weight": "fc.weight", "classifier.bias": "fc.bias"}
    module = Small()
    before = snapshot(module)
    report = restore_into(module, InitConfig(path=path, add_prefix="body.", rename=rename))
    (skip,) = report.skipped
    assert (skip.name, skip.file_shape, skip.shape) == ("fc.weight", (3, 4), (2, 4))
    assert torch.equal(module.fc.weight, before["fc.weight"])
    assert torch.equal(module.fc.bias, file["classifier.bias"])
    assert "fc.weight" not in report.missing and len(report.loaded) == len(before) - 1
    table = format_report(report)
    assert "skipped: shape mismatch (1)" in table and "file (3, 4) vs backbone (2, 4)" in table
    assert report_summary(report)["skipped_names"] == ["fc.weight"]

    module = Small()
    before = snapshot(module)
    with pytest.raises(UserError) as err:
        restore_into(module, InitConfig(path=path, add_prefix="body.", rename=rename,
                                        strict=True))
    assert_one_line(err, "strict", "fc.weight", "(3, 4)", "(2, 4)")
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # untouched

    with pytest.raises(UserError) as err:  # strict: every backbone tensor must be loaded
        restore_into(Small(), InitConfig(path=path, include=["stem.*"], add_prefix="body.",
                                         strict=True))
    assert_one_line(err, "strict", "7 backbone tensors not in the file", "body.bn.weight")


def test_nothing_loaded_lists_names_on_both_sides(tmp_path):
    path = save(small_file(), tmp_path / "small.pth")
    with pytest.raises(UserError) as err:
        restore_into(Small(), InitConfig(path=path))  # forgot add_prefix="body."
    assert_one_line(err, "nothing to load", "stem.weight", "body.stem.weight", "small.pth")
    with pytest.raises(UserError) as err:
        restore_into(Small(), InitConfig(path=path, include=["encoder.*"]))
    assert_one_line(err, "select none", "stem.weight", "body.stem.weight")


# -- file formats ---------------------------------------------------------------------------------

def test_lightning_checkpoint_loads(tmp_path):
    backbone = tiny_backbone()
    values = randomised(backbone.module.state_dict())
    ckpt = {"state_dict": {f"model.backbone.{k}": v for k, v in values.items()},
            "epoch": 3, "global_step": 120, "hyper_parameters": {"lr": 0.1, "name": "x"},
            "pytorch-lightning_version": "2.4.0"}
    path = save(ckpt, tmp_path / "epoch=3-step=120.ckpt")
    report = restore_into(backbone.module, InitConfig(path=path,
                                                      strip_prefix="model.backbone."))
    assert len(report.loaded) == len(values) and not report.missing
    for name, value in backbone.module.state_dict().items():
        assert torch.equal(value, values[name]), name


@pytest.mark.slow
def test_transferlab_checkpoint_restores_into_a_fresh_backbone(tiny_run):
    path = tiny_run / "checkpoints" / "last.pt"
    saved = torch.load(path, weights_only=True)["model"]
    backbone = tiny_backbone(seed=123)
    report = restore_into(backbone.module, InitConfig(path=str(path), strip_prefix="backbone."))
    for name, value in backbone.module.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{name}"]), name
    assert not report.missing and not report.skipped
    head = sorted(k for k in saved if k.startswith("head."))
    assert head and sorted(src for src, _ in report.unexpected) == head


@pytest.mark.parametrize("kind", ["random", "truncated", "text", "tensor", "objects", "missing"])
def test_unreadable_files_are_one_line_errors(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "truncated":
        torch.save(small_file(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "objects":  # a Lightning .ckpt with pickled Python objects
        torch.save({"state_dict": small_file(), "hparams": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UserError) as err:
        restore_into(Small(), InitConfig(path=str(path)))
    expected = "does not exist" if kind == "missing" else "expected a file written by torch.save"
    message = assert_one_line(err, "backbone.init.path", str(path), expected)
    if kind == "objects":
        assert "re-save only its state dict" in message


# -- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_with_init_records_the_report(tiny_run, tmp_path):
    source = tiny_run / "checkpoints" / "last.pt"
    cfg = compose_train([*TINY, f"backbone.init.path={source}", "seed=7",
                         "backbone.init.include=[backbone.*]",
                         "backbone.init.strip_prefix=backbone."])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    init = metrics["init"]
    assert init["path"] == str(source) and init["loaded"] == 86
    assert (init["missing"], init["unexpected"], init["skipped"]) == (0, 0, 0)

    # The linear probe keeps the backbone frozen (BatchNorm statistics too): the trained run's
    # backbone is the restored one, bit for bit.
    restored = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    original = torch.load(source, weights_only=True)["model"]
    backbone = [k for k in original if k.startswith("backbone.")]
    assert all(torch.equal(restored[k], original[k]) for k in backbone)

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("init/restore/text_summary")
    assert "backbone.init from last.pt" in text.tensor_proto.string_val[0].decode()


# -- backbone.weights_path ------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME and no downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))


def test_weights_path_loads_torchvision_weights_offline(tmp_path, offline):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    original = resnet18()
    path = save(original.state_dict(), tmp_path / "my-resnet18.pth")
    backbone = build_backbone(TorchvisionBackboneConfig(name="resnet18",
                                             pretrained=True, weights_path=path))
    assert torch.equal(backbone.module.conv1.weight, original.conv1.weight)
    bn = backbone.module.layer4[1].bn2
    assert torch.equal(bn.running_var, original.layer4[1].bn2.running_var)
    assert torch.equal(backbone.imagenet_head[-1].weight, original.fc.weight)
    assert len(backbone.categories) == 1000 and backbone.input.mean == (0.485, 0.456, 0.406)
    assert backbone.weights == path  # what the run logs: "weights from <file>"

    # Without the file, the offline error names it as the way out.
    with pytest.raises(UserError) as err:
        build_backbone(TorchvisionBackboneConfig(name="resnet18", pretrained=True))
    assert_one_line(err, "backbone.weights_path=<file>", "backbone.pretrained=false")


def test_weights_path_mistakes_are_one_line_errors(tmp_path, offline):
    from torchvision.models import resnet18

    cfg = TorchvisionBackboneConfig(name="resnet18", pretrained=True)
    cfg.weights_path = save(resnet18(num_classes=10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(UserError) as err:
        build_backbone(cfg)
    assert_one_line(err, "backbone.weights_path", "fc.weight", "(10, 512)", "backbone.init.path")
    cfg.weights_path = str(tmp_path / "nowhere.pth")
    with pytest.raises(UserError) as err:
        build_backbone(cfg)
    assert_one_line(err, "backbone.weights_path", "nowhere.pth", "does not exist")
    cfg.weights_path = str(tmp_path / "notes.txt")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(UserError) as err:
        build_backbone(cfg)
    assert_one_line(err, "backbone.weights_path", "notes.txt", "not a readable checkpoint")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_loads_timm_weights(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr("transferlab.backbones.timm_zoo.host_reachable",
                        lambda *a, **k: pytest.fail("weights_path must not go online"))
    torch.manual_seed(4)
    import timm

    original = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    else:
        torch.save(original.state_dict(), path)
    backbone = build_backbone(BackboneConfig(name="test_efficientnet", source="timm",
                                             pretrained=True, weights_path=str(path)))
    assert backbone.pretrained
    for name, value in backbone.module.state_dict().items():
        assert torch.equal(value, original.state_dict()[name]), name
