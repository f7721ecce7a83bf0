"""The freeze ledger: a hook that proves, stage by stage, that what the plan froze did not move.

At every stage start (after requires_grad, BatchNorm modes and the optimizer are set) it
writes down what the plan promises:

* the **frozen tensors**: every parameter the stage does not train, fingerprinted (a hash of
  its bytes);
* the **frozen statistics**: the buffers (running mean / var, batch count) of every BatchNorm
  layer the stage keeps in eval mode (its ``bn`` mode), fingerprinted too;
* the **optimizer**: its groups hold exactly the parameters that require grad, which are
  exactly the stage's selected ones, each at the LR the plan gave it.

It checks the fingerprints at the stage's end and, on a resume, against the ones the
checkpoint carries (a resume that re-froze, lost a group or got other weights breaks them).
A broken promise fails the run with one line naming the first tensor
(:class:`FreezeLedgerError`). ``metrics.json["ledger"]`` has a line per stage (tensors and
buffers checked, held or broken, which checks ran) and TensorBoard the same text under
``ledger/<stage>``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transferlab.engine.hooks import Hook, Recorder
from transferlab.errors import UserError
from transferlab.infra.delta import fingerprint
from transferlab.staging.policy import StagePlan, eval_batchnorms

RECORD_KEY = "ledger"  # metrics.json


class FreezeLedgerError(UserError):
    """A stage broke what its plan promised: a frozen tensor or statistic changed, or the
    optimizer's groups are not the plan's."""


def promised(model: nn.Module, plan: StagePlan) -> dict[str, torch.Tensor]:
    """What ``plan`` promises not to change: the parameters it does not train and the
    buffers of the BatchNorm layers it keeps in eval mode, by their state-dict names."""
    trainable = plan.trainable()
    out = {n: p for n, p in model.named_parameters() if n not in trainable}
    modules = dict(model.named_modules())
    for name in eval_batchnorms(model, plan.spec.bn, trainable):
        for buffer, tensor in modules[name].named_buffers(recurse=False):
            if tensor is not None:
                out[f"{name}.{buffer}" if name else buffer] = tensor
    return out


def optimizer_mismatch(model: nn.Module, plan: StagePlan,
                       optimizer: torch.optim.Optimizer) -> str | None:
    """Why the optimizer's groups are not the plan's (None: they are): exactly the
    parameters that require grad, exactly the plan's, each at its planned LR."""
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    planned = {n: g.lr for g in plan.groups for n in g.param_names}
    in_optimizer: dict[str, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = name_of.get(id(p), "<a tensor not in the model>")
            in_optimizer[name] = group.get("initial_lr", group["lr"])
    requires = {n for n, p in params.items() if p.requires_grad}
    for name in sorted(requires - planned.keys()):
        return f"{name} requires grad, but the stage does not train it"
    for name in sorted(planned.keys() - requires):
        return f"{name} is trained by the stage, but does not require grad"
    for name in sorted(planned.keys() - in_optimizer.keys()):
        return f"{name} is trained by the stage, but is in no optimizer group"
    for name in sorted(in_optimizer.keys() - planned.keys()):
        return f"{name} is in an optimizer group, but the stage does not train it"
    for name in sorted(planned):
        if not _same_lr(in_optimizer[name], planned[name]):
            return (f"{name} trains at lr {in_optimizer[name]:g} in the optimizer, "
                    f"the plan says {planned[name]:g}")
    return None


def _same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-30)


class FreezeLedger(Hook):
    """The ledger as a hook (see the module's docstring). ``recorder``: where the lines go
    (None: checks only, e.g. the LR finder's warm-up)."""

    def __init__(self, recorder: Recorder | None = None):
        self.recorder = recorder
        self.expected: dict[str, str] = {}
        self.checks: list[str] = []

    def on_stage_start(self, loop) -> None:
        plan = loop.plan
        self.expected = self._now(loop)
        self.checks = []
        why = optimizer_mismatch(loop.model, plan, loop.optimizer)
        if why is not None:
            self._broken(loop, f"stage '{plan.name}': {why}")
        saved = (getattr(loop.resume, "ledger", None) if loop.resuming else None) or {}
        if saved.get("stage") == plan.index:  # the fingerprints of the stage's first start
            self.checks.append("resume")
            self._compare(loop, saved["fingerprints"], self.expected, "at the checkpointed "
                          "stage's start", "after the resume")
            self.expected = dict(saved["fingerprints"])

    def on_stage_end(self, loop) -> None:
        self.checks.append("end")
        self._compare(loop, self.expected, self._now(loop), "at the stage's start",
                      f"after epoch {loop.epoch}")
        self._record(loop, held=True)

    def checkpoint_state(self, loop) -> dict[str, Any]:
        return {"ledger": {"stage": loop.plan.index, "fingerprints": dict(self.expected)}}

    @staticmethod
    def _now(loop) -> dict[str, str]:
        return {n: fingerprint(t) for n, t in promised(loop.model, loop.plan).items()}

    def _compare(self, loop, before: dict[str, str], after: dict[str, str], when_before: str,
                 when_after: str) -> None:
        stage = f"stage '{loop.plan.name}'"
        for name in sorted(before.keys() | after.keys()):
            if name not in after:
                self._broken(loop, f"{stage}: {name} was frozen {when_before}, but not "
                             f"{when_after}")
            if name not in before:
                self._broken(loop, f"{stage}: {name} is frozen {when_after}, but was not "
                             f"{when_before}")
            if before[name] != after[name]:
                kind = "tensor" if _is_parameter(loop.model, name) else "BatchNorm statistic"
                self._broken(loop, f"{stage} froze {name}, but the {kind} changed between its "
                             f"fingerprint {when_before} and {when_after}")

    def _broken(self, loop, line: str) -> None:
        self._record(loop, held=False, broken=line)
        raise FreezeLedgerError(f"freeze ledger: {line}")

    def _record(self, loop, held: bool, broken: str | None = None) -> None:
        if self.recorder is None:
            return
        plan = loop.plan
        params = {n for n, _ in loop.model.named_parameters()}
        entry = {"stage_index": plan.index, "tensors": sum(n in params for n in self.expected),
                 "statistics": sum(n not in params for n in self.expected),
                 "checks": list(self.checks), "held": held}
        if broken is not None:
            entry["broken"] = broken
        self.recorder.extra.setdefault(RECORD_KEY, {})[plan.name] = entry
        line = (f"{plan.name}: {entry['tensors']} frozen tensors, {entry['statistics']} frozen "
                f"BatchNorm statistics, optimizer groups = the plan; checks "
                f"{', '.join(self.checks) or 'none'}: {'held' if held else 'BROKEN: ' + broken}")
        self.recorder.log_text(f"ledger/{plan.name}", line, loop.epoch)


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False
