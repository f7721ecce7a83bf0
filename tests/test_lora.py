"""freeze=lora: peft's LoRA adapters on the layers ``freeze.target`` selects. Only the adapters
and the head train; merging them gives the adapter model's outputs; a run's checkpoint rebuilds
the adapted model in transferlab-eval / -predict and exports with the adapters merged."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

from transferlab.config import compose_config, load_config
from transferlab.config.validate import validate
from transferlab.errors import UserError
from transferlab.feature_cache import find_cut
from transferlab.infra.checkpoint import load_checkpoint
from transferlab.lora import merge_adapters
from transferlab.run import train
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, is_adapter, plan_stages, set_train_mode
from transferlab.staging.summary import stage_table

from .conftest import TINY, compose_train
from .stage_helpers import block_params, build_model, head_params, is_bn, random_loader

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = [*TINY, "backbone.name=test_vit", "dataset.image_size=160"]  # timm's tiny ViT: 160 px only


def lora_run(*extra: str, base=TINY):
    return load_config(compose_train([*base, "freeze=lora", *extra]))


def plain_model(base=TINY):
    """(model, backbone) of the same architecture without adapters (freeze=linear_probe)."""
    return build_model(load_config(compose_train([*base, "freeze=linear_probe"])))


def plain_layers(backbone, blocks, kinds=(nn.Linear, nn.Conv2d)) -> dict[str, nn.Module]:
    """The Linear / Conv2d layers under ``blocks`` of a model without adapters, from the
    module tree (not from lora.py)."""
    out = {}
    for block in blocks:
        for path in block.paths:
            for name, module in backbone.module.get_submodule(path).named_modules():
                if isinstance(module, kinds):
                    out[f"{path}.{name}" if name else path] = module
    return out


def randomise_adapters(model) -> None:
    """B starts at zero (the adapter adds nothing): give every adapter a visible effect."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# --- config ------------------------------------------------------------------------------------


def test_lora_defaults_compose():
    run = lora_run()
    f = run.freeze
    assert (f.target, f.layers, f.rank, f.alpha, f.dropout) == ("blocks[-4:]", "all", 8, 16, 0)
    (stage,) = f.stages
    assert [s.select for s in stage.train] == ["lora", "head"] and stage.bn == "frozen"
    assert stage.epochs == run.trainer.epochs


def test_config_mistakes_are_one_line():
    run = lora_run()
    for key, value, needle in [
        ("rank", 0, "freeze.rank must be >= 1"),
        ("alpha", 0.0, "freeze.alpha must be > 0"),
        ("dropout", 1.0, "freeze.dropout must be in [0, 1)"),
        ("target", " ", "freeze.target must be a selector"),
    ]:
        bad = copy.deepcopy(run)
        setattr(bad.freeze, key, value)
        with pytest.raises(UserError) as excinfo:
            validate(bad)
        assert needle in str(excinfo.value) and "\n" not in str(excinfo.value), key
    validate(copy.deepcopy(run))  # the defaults pass
    with pytest.raises(UserError) as excinfo:  # a LoraLayers: fails at composition
        compose_config([*TINY, "freeze=lora", "freeze.layers=attention"])
    assert str(excinfo.value).startswith("freeze.layers must be one of linear, conv, all")


@pytest.mark.parametrize(("extra", "needle"), [
    (["freeze.target=backbone.blocks.9.*"], "freeze.target='backbone.blocks.9.*' matches no "
                                            "parameter; nearest names: "),
    (["freeze.target=head"], "selects head.2.weight: LoRA adapts backbone layers"),
    (["freeze.layers=linear"], "selects no layer LoRA can adapt, only 13 Conv2d layers "
                               "(freeze.layers=linear): select other blocks"),
])
def test_a_target_without_layers_to_adapt_is_one_line(extra, needle):
    with pytest.raises(UserError) as excinfo:
        build_model(lora_run(*extra))
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_without_peft_it_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(UserError, match=r"^freeze=lora needs the peft package: pip install "
                                        r"'transferlab\[lora\]'$"):
        build_model(lora_run())


def test_the_lora_selector_needs_adapters():
    run = load_config(compose_train([*TINY, "freeze=top_k", "freeze.stages.0.train=[lora]"]))
    model, backbone = build_model(run)
    with pytest.raises(UserError, match="the model has no LoRA adapters"):
        plan_stages(model, backbone, run.freeze, run.optimizer.lr)


# --- what trains ---------------------------------------------------------------------------------


@pytest.mark.slow  # peft builds adapters on the EfficientNet: the fast tier checks the ViT
def test_only_adapter_and_head_parameters_change():
    run = lora_run("optimizer.lr=0.01")
    model, backbone = build_model(run)
    target = backbone.blocks[-4:]
    convs = plain_layers(plain_model()[1], target, nn.Conv2d)
    grouped = {p for p, m in convs.items() if m.groups > 1}
    assert grouped and set(model.adapters.layers) == set(convs) - grouped
    assert set(model.adapters.skipped) == grouped
    adapters = {n for n, _ in model.named_parameters() if is_adapter(n)}
    assert len(adapters) == 2 * len(model.adapters.layers)  # lora_A and lora_B of each
    assert {n.split(".lora_")[0] for n in adapters} == {f"backbone.{p}" for p in convs} - {
        f"backbone.{p}" for p in grouped}
    assert adapters <= block_params(backbone, target)  # the adapters belong to their blocks

    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert plan.trainable() == adapters | head_params(model)
    apply_stage(model, plan)
    table = stage_table(model, backbone, plan)
    adapter_count = sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    assert model.adapters.params == adapter_count
    assert f"trainable: {adapter_count + sum(p.numel() for p in model.head.parameters()):,}" \
        in table and "LoRA (peft): rank 8, alpha 16" in table.splitlines()[-1]

    optimizer = stage_optimizer(model, plan, run.optimizer, None)
    set_train_mode(model, plan)
    assert not any(m.training for m in model.backbone.modules() if is_bn(m))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for x, y in random_loader(run.dataset.image_size):  # 2 steps: B moves, then A too
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    after = model.state_dict()
    assert any(k.endswith("base_layer.weight") for k in after)  # the original weights
    for key, tensor in after.items():
        same = torch.equal(tensor, before[key])
        if key in plan.trainable():
            assert not same, f"{key} did not train"
        else:
            assert same, f"{key} changed (only the adapters and the head train)"


@pytest.mark.slow  # the end-to-end run checks the cut too
def test_the_feature_cache_stops_before_the_first_adapted_block():
    run = lora_run("freeze.target='blocks[-3:]'")
    model, backbone = build_model(run)
    (plan,) = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    apply_stage(model, plan)
    set_train_mode(model, plan)
    cut, why = find_cut(model, backbone, run.dataset.image_size, {})
    assert cut is not None and cut.last_block == backbone.blocks[-4].name, why
    assert "lora_A.default trains after it" in why


# --- merging -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "target", "size"), [
    pytest.param(VIT, "blocks[-3:]", 160,  # Linear layers: the fused qkv, proj, fc1, fc2
                 marks=pytest.mark.slow),
    pytest.param(VIT, "backbone.patch_embed.proj", 160,  # a Conv2d (16x16, stride 16)
                 marks=pytest.mark.slow),
    pytest.param(TINY, "blocks[-4:]", 32,  # EfficientNet's 1x1 and 3x3 convolutions
                 marks=pytest.mark.slow),
], ids=["vit-qkv-proj-mlp", "vit-patch-conv", "efficientnet-convs"])
def test_the_merged_model_gives_the_adapter_models_outputs(base, target, size):
    model, _ = build_model(lora_run(f"freeze.target='{target}'", base=base))
    adapted = model.adapters.layers
    plain, backbone = plain_model(base)
    if target == "blocks[-3:]" and base is VIT:
        linears = plain_layers(backbone, backbone.blocks[-3:], nn.Linear)
        assert set(adapted) == set(linears) and "blocks.4.attn.qkv" in adapted
        assert linears["blocks.4.attn.qkv"].out_features == 3 * 64  # q, k and v in one layer
    randomise_adapters(model)
    model.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        off = copy.deepcopy(model)
        for module in off.modules():  # the same model without the adapters' updates
            if hasattr(module, "enable_adapters"):
                module.enable_adapters(False)
        assert (off(x) - reference).abs().max() > 1e-3, "the adapters should change outputs"
    merged = copy.deepcopy(model)
    assert merge_adapters(merged) == len(adapted) and merged.adapters is None
    assert set(merged.state_dict()) == set(plain.state_dict())  # the plain architecture
    assert all(type(merged.backbone.get_submodule(p)) in (nn.Linear, nn.Conv2d) for p in adapted)
    with torch.no_grad():
        assert torch.allclose(merged(x), reference, atol=1e-5, rtol=1e-5)


# --- a run, end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lora_run_round_trips_through_eval_predict_and_export(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from transferlab.cli.evaluate import main as eval_main
    from transferlab.cli.export import main as export_main
    from transferlab.cli.predict import main as predict_main

    run_dir = tmp_path / "run"
    result = train(compose_train([*TINY, "freeze=lora", "optimizer.lr=0.01",
                                  "freeze.dropout=0.1"]), run_dir)
    metrics = result.metrics
    assert metrics["lora"]["layers"] == list(result.built.model.adapters.layers)
    assert metrics["params"]["trainable"] == metrics["lora"]["params"] + sum(
        p.numel() for p in result.built.model.head.parameters())
    assert metrics["feature_cache"]["lora"]["cut"] == "the backbone after block blocks.1.0"
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]
    trained = [k for k in state if ".lora_B." in k]
    assert trained and all(state[k].abs().sum() > 0 for k in trained)

    assert eval_main([f"run={run_dir}", "device=cpu"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["best"]["val_acc"], abs=1e-6)
    assert report["loss"] == pytest.approx(metrics["best"]["val_loss"], abs=1e-4)

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 32), (60 * i, 120, 200)).save(images / f"{i}.png")
    assert predict_main([f"run={run_dir}", str(images)]) == 0
    assert len((run_dir / "predictions.csv").read_text().splitlines()) == 3

    capsys.readouterr()
    assert export_main([f"run={run_dir}", "samples=8"]) == 0
    out = capsys.readouterr().out
    assert "adapters merged into the weights" in out and "merged LoRA vs adapters" in out
    record = json.loads((run_dir / "export" / "preprocessing.json").read_text())
    assert record["lora"]["merged"] == len(metrics["lora"]["layers"])
    check = record["verification"]
    assert check["passed"] and check["merge_max_abs_diff"] <= 1e-5
    import onnx

    names = {t.name for t in onnx.load(str(run_dir / "export" / "model.onnx")).graph.initializer}
    assert not any("lora" in n for n in names)
