"""What a resume refuses, in one line, instead of going on wrongly: a damaged checkpoint (its
SHA-256 seal), one with missing keys, a data set that changed on disk, a run another process
is writing (its lock); and the commands that say how to go on."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.infra.checkpoint import (
    SEAL,
    CorruptCheckpoint,
    check_seal,
    read_file,
    save_checkpoint,
)


def small_checkpoint(path: Path) -> None:
    model = nn.Linear(4, 3)
    save_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    epoch=1, stage_index=0, stage_name="head", config={}, history=[],
                    best=None, classes=["a", "b", "c"],
                    loop={"step": 3, "schedule_step": 3, "data": {}})




# --- the seal: fast mechanics ---------------------------------------------------------------


def test_a_checkpoint_is_sealed_and_still_a_torch_file(tmp_path):
    path = tmp_path / "last.pt"
    small_checkpoint(path)
    assert check_seal(path) is True
    assert path.read_bytes()[-len(SEAL) - 64:].startswith(SEAL)
    assert zipfile.ZipFile(path).testzip() is None  # a valid zip archive, its comment the seal
    assert torch.load(path, weights_only=True)["epoch"] == 1  # what other tools read
    assert read_file(path)["classes"] == ["a", "b", "c"]
    assert not path.with_suffix(".tmp").exists()  # written to a temporary file, renamed


@pytest.mark.parametrize("where", ["middle", "digest"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_others(tmp_path, where):
    path = tmp_path / "last.pt"
    small_checkpoint(path)
    shutil.copyfile(path, tmp_path / "epoch_1.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if where == "middle" else -1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint) as info:
        read_file(path)
    message = str(info.value)
    assert message == (f"checkpoint: {path} is corrupt: its bytes do not match the SHA-256 "
                       "written with it (a damaged disk or an interrupted copy); use another "
                       "of its checkpoints (epoch_1.pt) or train again")
    assert isinstance(info.value, UserError)


def test_a_checkpoint_without_a_seal_loads_unchecked(tmp_path):
    path = tmp_path / "old.pt"  # as earlier versions (and torch.save anywhere) wrote it
    torch.save({"format": "transferlab-checkpoint/2", "model": {"w": torch.ones(2)}}, path)
    assert check_seal(path) is False
    assert torch.equal(read_file(path)["model"]["w"], torch.ones(2))


# --- the checkpoint's keys, the data's identity, the lock: fast mechanics ----------------------












# --- real processes ---------------------------------------------------------------------------
















