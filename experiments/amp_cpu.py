"""CPU training speed with ``trainer.amp=off`` (float32) against ``trainer.amp=bf16`` (CPU
autocast to bfloat16), in the same process, alternating.

    python experiments/amp_cpu.py                        # default backbone, 224 px, batch 32
    python experiments/amp_cpu.py --freeze none --steps 3 --repeats 3

Both settings train copies of the same model (the default backbone, EfficientNet-Lite0 with its
ImageNet weights, and a linear head) on the same batches with transferlab's own training step
(:func:`transferlab.engine.epoch.train_epoch`, channels-last as a run does); runs alternate
(off, bf16, off, bf16, ...) after one warm-up each, and the median of ``--repeats`` is
reported with the ratio off / bf16 time (> 1: bf16 is faster), in wall-clock seconds and in
this process's CPU seconds (less sensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from transferlab.backbones import build_backbone, probe_features
from transferlab.config import BackboneConfig, FreezeConfig, HeadConfig, StageSpec, make_config
from transferlab.config import SelectorSpec as Sel
from transferlab.engine.context import EpochContext
from transferlab.engine.epoch import CrossEntropy, train_epoch
from transferlab.heads import build_head
from transferlab.infra.runtime import Precision
from transferlab.model import TransferModel
from transferlab.staging.optim import stage_optimizer
from transferlab.staging.policy import apply_stage, plan_stages, set_train_mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freeze", choices=["linear_probe", "none"], default="linear_probe")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0",
                                             source="efficientnet_lite0_package"))
    shape = probe_features(backbone, args.image_size)
    model = TransferModel(backbone.module, build_head(HeadConfig(name="linear"), shape, 10))
    train = [Sel("head")] if args.freeze == "linear_probe" else [Sel("backbone"), Sel("head")]
    policy = FreezeConfig(name=args.freeze, stages=[StageSpec(name="s", epochs=1, train=train)])
    opt_cfg = make_config("optimizer", "adam", lr=1e-3)
    (plan,) = plan_stages(model, backbone, policy, opt_cfg.lr)
    apply_stage(model, plan)
    model.to(memory_format=torch.channels_last)
    n = args.steps * args.batch_size
    data = TensorDataset(torch.randn(n, 3, args.image_size, args.image_size),
                         torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)

    runs = {}
    for mode in ("off", "bf16"):
        copy_ = copy.deepcopy(model)
        runs[mode] = (copy_, stage_optimizer(copy_, plan, opt_cfg, None), Precision(cpu, mode))

    def epoch(mode: str) -> tuple[float, float, float]:
        """Wall-clock and this process's CPU seconds of ``args.steps`` steps, and the loss."""
        m, opt, precision = runs[mode]
        set_train_mode(m, plan)
        start, cpu_start = time.perf_counter(), time.process_time()
        stats = train_epoch(m, loader, CrossEntropy(), opt,
                            EpochContext(cpu, precision, channels_last=True))
        return time.perf_counter() - start, time.process_time() - cpu_start, stats.loss

    for mode in runs:  # warm-up
        epoch(mode)
    wall: dict[str, list[float]] = {mode: [] for mode in runs}
    cpu_time: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(args.repeats):
        for mode in runs:
            seconds, cpu_seconds, loss = epoch(mode)
            wall[mode].append(seconds)
            cpu_time[mode].append(cpu_seconds)
            print(f"  amp={mode:4s} {seconds:6.2f} s wall  {cpu_seconds:6.2f} s CPU  "
                  f"loss {loss:.4f}", flush=True)
    median = {mode: statistics.median(t) for mode, t in wall.items()}
    median_cpu = {mode: statistics.median(t) for mode, t in cpu_time.items()}
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads ({os.cpu_count()} cores), torch {torch.__version__}")
    print(f"efficientnet_lite0 at {args.image_size}px, freeze={args.freeze}, batch "
          f"{args.batch_size}, {args.steps} steps, median of {args.repeats}")
    for mode, seconds in median.items():
        print(f"amp={mode:4s}: {seconds / args.steps:6.3f} s/step  {n / seconds:7.1f} images/s  "
              f"({median_cpu[mode] / args.steps:6.3f} CPU s/step)")
    print(f"ratio (off time / bf16 time): wall {median['off'] / median['bf16']:.2f}, "
          f"CPU {median_cpu['off'] / median_cpu['bf16']:.2f}")


if __name__ == "__main__":
    main()
