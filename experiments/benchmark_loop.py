"""Throughput of transferlab's training loop against a plain PyTorch loop, in the same process.

    python experiments/benchmark_loop.py                      # default backbone, 64 px, CPU
    python experiments/benchmark_loop.py --freeze none --image-size 96 --device cuda

The loops train the same model (same weights, same frozen parts, same batches) for the same
number of steps: the plain loop is the textbook one (zero_grad, forward, loss, backward, step);
transferlab's pass is ``engine.epoch.train_epoch`` with the run's LR schedule and logging; the
engine is the whole ``engine.stages.fit_stages`` of one stage of one epoch (the stage's set-up,
its optimizer, the hooks, the freeze ledger's fingerprints at the stage's start and end). Runs
alternate and the median of ``--repeats`` is reported, with the ratios to the plain loop
(1.00 = no overhead).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from transferlab.backbones import build_backbone, probe_features
from transferlab.config import (
    AdamConfig,
    BackboneConfig,
    FreezeConfig,
    HeadConfig,
    SchedulerConfig,
    StageSpec,
)
from transferlab.config import SelectorSpec as Sel
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.engine.hooks import Distributed, LogLearningRates
from transferlab.engine.ledger import FreezeLedger
from transferlab.engine.stages import Loop, fit_stages
from transferlab.engine.stepping import StepCalls
from transferlab.heads import build_head
from transferlab.infra.runtime import Precision, pick_device
from transferlab.model import TransferModel
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages, set_train_mode
from transferlab.staging.schedule import StageSchedule


def plain_epoch(model, loader, optimizer, device, channels_last):
    criterion = nn.CrossEntropyLoss()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        x, y = x.to(device, memory_format=fmt), y.to(device)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--source", default="efficientnet_lite0_package")
    ap.add_argument("--freeze", choices=["linear_probe", "none"], default="linear_probe")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-channels-last", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = pick_device(args.device)
    channels_last = not args.no_channels_last
    backbone = build_backbone(BackboneConfig(name=args.backbone, source=args.source))
    shape = probe_features(backbone, args.image_size)
    model = TransferModel(backbone.module, build_head(HeadConfig(name="linear"), shape, 10))
    train = [Sel("head")] if args.freeze == "linear_probe" else [Sel("backbone"), Sel("head")]
    policy = FreezeConfig(name=args.freeze, stages=[StageSpec(name="s", epochs=1, train=train)])
    opt_cfg = AdamConfig(name="adam", lr=1e-3)
    (plan,) = plan_stages(model, backbone, policy, opt_cfg.lr)
    apply_stage(model, plan)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    n = args.steps * args.batch_size
    data = TensorDataset(torch.randn(n, 3, args.image_size, args.image_size),
                         torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
    precision = Precision(device, "off")  # same arithmetic in both loops

    plain_model = copy.deepcopy(model)
    plain_opt = torch.optim.Adam([p for p in plain_model.parameters() if p.requires_grad], lr=1e-3)
    ours_opt = stage_optimizer(model, plan, opt_cfg, None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    writer = SummaryWriter(tempfile.mkdtemp(prefix="bench-tb-"))
    step = 0

    schedule = StageSchedule(SchedulerConfig(), 1, len(loader))

    def log_lrs(opt):  # what a run does before every step: schedule, lr/<group> scalars
        nonlocal step
        schedule.apply(opt)
        step += 1
        for group in opt.param_groups:
            writer.add_scalar(f"lr/{group['name']}", group["lr"], step)

    def run_ours():
        set_train_mode(model, plan)
        train_epoch(model, loader, CrossEntropy(), ours_opt,
                    EpochContext(device, precision, channels_last=channels_last),
                    hooks=StepCalls(before=log_lrs))

    set_train_mode(model, plan)
    eval_modules = {name for name, m in model.named_modules() if not m.training}

    def run_plain():
        plain_model.train()
        for name, m in plain_model.named_modules():  # the same frozen-BN handling
            if name in eval_modules:
                m.eval()
        plain_epoch(plain_model, loader, plain_opt, device, channels_last)

    class Recorder:  # where the engine's LR hook writes: the same SummaryWriter
        extra: dict = {}

        def __init__(self):
            self.writer = writer

        def log_lrs(self, at: int, opt) -> None:
            for group in opt.param_groups:
                writer.add_scalar(f"lr/{group['name']}", group["lr"], at)

    no_val = DataLoader(TensorDataset(torch.zeros(0, 3, 1, 1), torch.zeros(0)), batch_size=1)

    def run_engine():  # the whole staged loop: one stage of one epoch, no evaluation data
        loop = Loop(model=model, plans=[plan], ctx=EpochContext(device, precision,
                                                               channels_last=channels_last),
                    train_loader=loader, val_loader=no_val, optimizer_cfg=opt_cfg,
                    scheduler_cfg=SchedulerConfig(), train_objective=CrossEntropy(),
                    eval_objective=CrossEntropy(),
                    hooks=[Distributed(), LogLearningRates(Recorder(), 1), FreezeLedger()])
        fit_stages(loop)

    run_ours(), run_plain(), run_engine()  # warm-up
    ours, plain, engine = [], [], []
    for _ in range(args.repeats):
        ours.append(timed(run_ours))
        plain.append(timed(run_plain))
        engine.append(timed(run_engine))
    t_ours, t_plain = statistics.median(ours), statistics.median(plain)
    t_engine = statistics.median(engine)
    print(f"device {device}, {args.backbone} at {args.image_size}px, freeze={args.freeze}, "
          f"batch {args.batch_size}, {args.steps} steps, median of {args.repeats}")
    print(f"plain PyTorch loop : {n / t_plain:8.1f} images/s")
    print(f"transferlab pass   : {n / t_ours:8.1f} images/s  (train_epoch + LR schedule/logging)")
    print(f"transferlab engine : {n / t_engine:8.1f} images/s  (fit_stages: the stage set-up, "
          "the hooks, the freeze ledger's fingerprints)")
    print(f"ratio (transferlab pass / plain throughput): {t_plain / t_ours:.3f}")
    print(f"ratio (transferlab engine / plain throughput): {t_plain / t_engine:.3f}")


if __name__ == "__main__":
    main()
