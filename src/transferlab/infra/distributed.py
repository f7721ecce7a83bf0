"""One run on N processes: PyTorch DistributedDataParallel (DDP) under ``torchrun``.

``torchrun --nproc_per_node=N -m transferlab.train ...`` starts N copies of the run; each
trains on its shard of every global batch, and DDP averages the gradients. What this module
gives the rest of the code is a :class:`World` (which process this is, of how many) whose
collectives are no-ops for a run of one process, so the loop is the same either way:

* the process group is set up from torchrun's environment (:func:`init_from_env`); the
  backend follows the device: ``nccl`` for CUDA tensors, ``gloo`` for CPU ones;
* every process builds the same model (same seed); at each stage start the module that
  trains is wrapped afresh (:meth:`World.wrap`), so DDP sees exactly the stage's trainable
  parameters, and released at its end (:meth:`World.release`);
* losses, accuracies and counts are summed over the processes (:meth:`World.sum`), so every
  process records the same, whole-split metrics and takes the same decisions (best epoch,
  early stopping, stopping on a signal);
* only rank 0 writes: the record, TensorBoard, checkpoints and the console.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from transferlab.errors import UserError
from transferlab.infra.processes import LOCAL_RANK, launched

log = logging.getLogger("transferlab")

def init_from_env() -> World:
    """Join the process group torchrun's environment describes (once; a no-op for a single
    process or when the group exists already) and return this process's :class:`World`.

    The backend follows the device: CUDA tensors go through NCCL, CPU tensors (the CPU-side
    collectives, and a whole run with ``trainer.device=cpu``) through Gloo."""
    if launched() and not dist.is_initialized():
        local = int(os.environ.get(LOCAL_RANK, "0"))
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return current_world()


def current_world() -> World:
    """This process's place: from the process group when there is one, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get(LOCAL_RANK, rank)))


@dataclass(frozen=True)
class World:
    """Which process this is (``rank``), of how many (``size``), and its rank on its node
    (``local_rank``: its GPU). Every collective is a no-op for a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Several processes train this run."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that writes (rank 0)."""
        return self.rank == 0

    def backend(self, device: torch.device) -> str:
        """The backend the collectives on ``device``'s tensors go through."""
        if not self.active:
            return "none"
        name = str(dist.get_backend())
        if ":" not in name:
            return name
        pairs = dict(item.split(":") for item in name.split(","))
        return pairs.get(device.type, name)

    def record(self, device: torch.device, trainer) -> dict[str, Any]:
        """What ``metrics.json["distributed"]`` says of the run's processes and batches."""
        batch = trainer.batch_size
        return {"world_size": self.size, "backend": self.backend(device),
                "batch_size_per_process": batch,
                "global_batch_size": batch * self.size * trainer.accumulate_grad_batches,
                "lr_scale": self.lr_scale(trainer), "sync_bn": trainer.distributed.sync_bn}

    def lr_scale(self, trainer) -> int:
        """The factor of every LR: the number of processes with ``distributed.scale_lr``."""
        return self.size if trainer.distributed.scale_lr else 1

    # -- collectives ----------------------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over the processes (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process."""
        return not self.max_int(int(not flag)) if self.active else flag

    def first(self, value: Any) -> Any:
        """The first value that is not None over the processes in rank order (None if none)."""
        if not self.active:
            return value
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return next((v for v in values if v is not None), None)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` (tensors and plain data, e.g. RNG states) in rank order on
        rank 0 (None elsewhere). It travels as a ``torch.save`` file, read back with
        ``weights_only=True``."""
        if not self.active:
            return [value]
        buffer = io.BytesIO()
        torch.save(value, buffer)
        out: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(buffer.getvalue(), out, dst=0)
        if out is None:
            return None
        return [torch.load(io.BytesIO(data), weights_only=True) for data in out]

    # -- data -----------------------------------------------------------------------------
    def shard(self, n: int) -> list[int]:
        """This process's share of ``n`` items in order, not padded: items rank, rank + size,
        ... (every item on exactly one process)."""
        return list(range(self.rank, n, self.size))

    def gather_rows(self, local: torch.Tensor, n: int, chunk_rows: int = 4096) -> torch.Tensor:
        """The whole (n, ...) tensor, on every process, from each process's rows of it
        (:meth:`shard`: row ``rank + i * size`` is its ``local[i]``), moved in chunks."""
        if not self.active:
            return local
        per = math.ceil(n / self.size)
        padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype)
        padded[:len(local)] = local
        full = torch.zeros((n, *local.shape[1:]), dtype=local.dtype)
        for start in range(0, per, chunk_rows):
            part = padded[start:start + chunk_rows].contiguous()
            parts = [torch.empty_like(part) for _ in range(self.size)]
            dist.all_gather(parts, part)
            rows = torch.arange(start, start + len(part))
            for rank, got in enumerate(parts):
                index = rows * self.size + rank
                keep = index < n
                full[index[keep]] = got[keep]
        return full

    # -- the model ------------------------------------------------------------------------
    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` as the stage trains it: in DDP, which registers exactly the parameters
        that require gradients now (the stage's), with no ``find_unused_parameters``; the
        module itself for a single process (or a stage that trains nothing)."""
        if not self.active or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    @staticmethod
    def release(wrapped: nn.Module) -> None:
        """End a stage's wrapper: its gradient hooks leave the parameters, which the next
        stage's wrapper takes with its own set."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(wrapped, DistributedDataParallel):
            wrapped._remove_autograd_hooks()

    def average_batchnorm_stats(self, model: nn.Module) -> None:
        """After a training epoch: the running statistics of every BatchNorm layer that
        trained are averaged over the processes (each saw its own batches), so that every
        process evaluates and saves the same model. Layers in eval mode are not touched."""
        if not self.active:
            return
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                for buf in (module.running_mean, module.running_var):
                    if buf is not None:
                        dist.all_reduce(buf)
                        buf.div_(self.size)

    def check_same_weights(self, model: nn.Module, where: str) -> None:
        """Every process holds the same weights (parameters and buffers): a fingerprint per
        tensor is compared with rank 0's; a difference is an error naming the first tensor."""
        if not self.active:
            return
        state = model.state_dict()
        mine = torch.tensor([float(v.double().sum()) for v in state.values()],
                            dtype=torch.float64)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        differ = (mine != ref).nonzero()
        if self.max_int(len(differ)):
            name = list(state)[int(differ[0])] if len(differ) else "(another process's)"
            raise RuntimeError(f"{where}: the processes hold different weights ({name} on rank "
                               f"{self.rank} differs from rank 0's)")


def pick_device_for(device: torch.device, name: str, world: World) -> torch.device:
    """The device of this process: ``device`` (from ``trainer.device``) for a single process;
    under torchrun, CUDA is the process's own GPU (``cuda:<LOCAL_RANK>``)."""
    if not world.active:
        return device
    if device.type == "mps":
        raise UserError("trainer.device=mps: DDP (several processes) does not run on MPS; use "
                        "trainer.device=cpu, or train with one process")
    if device.type != "cuda":
        return device
    if ":" in name:
        raise UserError(f"trainer.device={name}: under torchrun each process takes the GPU of its "
                        "LOCAL_RANK; use trainer.device=auto or cuda (CUDA_VISIBLE_DEVICES picks "
                        "the GPUs)")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise UserError(f"process {world.local_rank} of this node has no GPU ({count} visible): "
                        f"start at most {count} processes per node (--nproc_per_node={count})")
    return torch.device("cuda", world.local_rank)
