"""trainer.amp: auto | off | bf16 | fp16 (runtime.Precision), old true/false configs."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferlab.config import AmpMode, compose_config, load_config
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.errors import UserError
from transferlab.infra.runtime import Precision
from transferlab.run import train

from .conftest import TINY, compose_train

CPU = torch.device("cpu")


def one_epoch(mode: str) -> tuple[list[tuple[torch.dtype, bool]], float]:
    """Train a small MLP for 2 steps under ``Precision(CPU, mode)``; what its first Linear
    layer saw (output dtype, CPU autocast on) at each forward, and the epoch's loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    seen: list[tuple[torch.dtype, bool]] = []
    model[0].register_forward_hook(
        lambda module, args, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu"))))
    data = TensorDataset(torch.randn(16, 16), torch.randint(0, 3, (16,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_epoch(model, DataLoader(data, batch_size=8), CrossEntropy(), optimizer,
                        EpochContext(CPU, Precision(CPU, mode)))
    return seen, stats.loss


def test_bf16_on_cpu_runs_under_autocast_and_the_loss_is_finite():
    seen, loss = one_epoch("bf16")
    assert seen == [(torch.bfloat16, True)] * 2
    assert math.isfinite(loss)
    precision = Precision(CPU, "bf16")
    assert precision.enabled and precision.label == "bf16-mixed"
    assert not precision.scaler.is_enabled()


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_off_and_auto_on_cpu_run_in_float32(mode):
    seen, loss = one_epoch(mode)
    assert seen == [(torch.float32, False)] * 2
    assert math.isfinite(loss)
    assert Precision(CPU, mode).label == "32"


def test_fp16_on_cpu_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"^trainer.amp=fp16 needs CUDA, not cpu: use "
                                        r"trainer.amp=bf16 .* or trainer.amp=off$"):
        Precision(CPU, "fp16")
    # evaluating a run trained with fp16 on CUDA, on the CPU: full precision, no error
    assert not Precision(CPU, "fp16", inference=True).enabled


def test_fp16_on_cpu_stops_a_run_before_training(tmp_path):
    cfg = compose_train([*TINY, "trainer.device=cpu", "trainer.amp=fp16"])
    with pytest.raises(UserError, match="trainer.amp=fp16 needs CUDA"):
        train(cfg, tmp_path)
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("given", ["auto", "off", "bf16", "fp16"])
def test_amp_overrides(given):
    run = load_config(compose_train([*TINY, f"trainer.amp={given}"]))
    assert run.trainer.amp == given and run.trainer.amp is AmpMode[given]
    assert run.as_dict()["trainer"]["amp"] == given
    assert type(run.as_dict()["trainer"]["amp"]) is str  # plain data: checkpoints, JSON


@pytest.mark.parametrize("given, mode", [("true", "auto"), ("false", "off")])
def test_an_old_bool_amp_override_is_one_line_naming_its_mode(given, mode):
    # trainer.amp is an AmpMode: OmegaConf takes no bool for it (Hydra reads true as one)
    with pytest.raises(UserError) as info:
        load_config(compose_config([*TINY, f"trainer.amp={given}"]))
    message = str(info.value)
    assert message.startswith("trainer.amp must be one of auto, off, bf16, fp16, got ")
    assert f"trainer.amp={mode}" in message and "\n" not in message


@pytest.mark.parametrize("saved, expected", [(True, "auto"), (False, "off"),
                                             ("True", "auto"), ("False", "off")])
def test_an_old_saved_config_with_a_bool_amp_still_loads(saved, expected):
    plain = OmegaConf.to_container(compose_train(TINY), resolve=True)
    plain["trainer"]["amp"] = saved  # as a checkpoint of an older version holds it
    run = load_config(plain)
    assert run.trainer.amp == expected and run.as_dict()["trainer"]["amp"] == expected


def test_an_unknown_amp_mode_is_one_line():
    with pytest.raises(UserError) as info:
        load_config(compose_config([*TINY, "trainer.amp=bf61"]))
    message = str(info.value)
    assert message.startswith("trainer.amp must be one of auto, off, bf16, fp16, got 'bf61'")
    assert "did you mean 'bf16'" in message and "\n" not in message


@pytest.mark.slow  # a whole (tiny) run: 3-10 s on a busy 2-core machine
def test_a_run_with_bf16_on_cpu_trains_and_records_finite_numbers(tmp_path, one_thread):
    # freeze=none: the whole network trains under autocast (no cached frozen features)
    result = train(compose_train([*TINY, "freeze=none", "trainer.device=cpu",
                                  "trainer.amp=bf16"]), tmp_path)
    assert result.built.precision.label == "bf16-mixed"
    assert result.built.run.trainer.amp == "bf16"
    assert result.metrics["status"] == "completed"
    epoch = result.metrics["history"][-1]
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["val_loss"]), epoch


def test_resume_auto_takes_an_old_bool_amp_for_its_mode():
    from transferlab.run.resume import same_config

    assert same_config({"trainer": {"amp": True}}, {"trainer": {"amp": "auto"}}) == []
    assert same_config({"trainer": {"amp": False}}, {"trainer": {"amp": "off"}}) == []
    assert same_config({"trainer": {"amp": True}}, {"trainer": {"amp": "bf16"}}) \
        == ["trainer.amp"]
