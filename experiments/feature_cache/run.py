"""Feature cache measurements: hymenoptera, the default backbone (EfficientNet-Lite0, 224 px).

    python experiments/feature_cache/run.py                # everything (about 40 min on 2 cores)
    python experiments/feature_cache/run.py --skip-sweep   # without the 8-job sweeps

Measures, one after the other on this machine (nothing else should run meanwhile):

1. the physical floor: one forward pass of the backbone over train + val (in this process);
2. a plain PyTorch loop (frozen backbone, new Linear head, 10 epochs, the same images and
   batches: decode + forward every epoch), in this process;
3. ``transferlab-train`` 10-epoch linear probes as separate processes (wall time includes
   the start-up): without the cache (``mode=off``), with a cold cache (an empty store) and
   with a warm one (the same store again);
4. a joblib sweep ``optimizer.lr=1e-2,3e-3,1e-3,3e-4 seed=0,1`` (8 linear probes, 2 at a
   time) with and without the cache;
5. a ``two_stage`` run with ``fine_tune_at`` in the middle of the backbone, with and without
   the cache: seconds per stage (epochs, plus the extraction) and the cache's size.

Results go to ``results.json`` beside this script (and a table to stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study_stats import timed  # noqa: E402

EPOCHS = 10
COMMON = ["dataset=hymenoptera", "trainer.progress=false"]
PROBE = [f"trainer.epochs={EPOCHS}"]  # linear probes; two_stage: 5 + 5 epochs (its default)
SWEEP = [*PROBE, "optimizer.lr=1e-2,3e-3,1e-3,3e-4", "seed=0,1", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2"]
MIDDLE = 9  # of the 18 blocks of EfficientNet-Lite0: blocks[9:] (blocks.4.0 up) fine-tune


def train(args: list[str], out: Path, cache: Path, multirun: bool = False) -> tuple[float, Path]:
    """Run transferlab-train; (wall seconds of the whole process, its run or sweep dir)."""
    where = (f"hydra.sweep.dir={out}" if multirun else f"hydra.run.dir={out}")
    return timed(["transferlab-train", *(["-m"] if multirun else []), *COMMON, *args, where,
                  f"trainer.feature_cache.dir={cache}"]), out


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def stage_seconds(m: dict) -> dict[str, float]:
    """Seconds per stage: its epochs' train + val seconds, plus the cache's build seconds."""
    out: dict[str, float] = {}
    for record in m["history"]:
        out[record["stage"]] = out.get(record["stage"], 0.0) + record["seconds"]
    for stage, report in (m.get("feature_cache") or {}).items():
        if report.get("cut"):
            out[stage] = out.get(stage, 0.0) + report["seconds"]
    return {k: round(v, 2) for k, v in out.items()}


def in_process_baselines(root: Path) -> dict:
    """The floor (one forward pass over train + val) and the plain PyTorch loop."""
    import torch
    from torch import nn

    from transferlab.backbones import build_backbone, probe_features
    from transferlab.config import AugmentConfig, FolderDatasetConfig, TrainerConfig, load_config
    from transferlab.config.store import register_configs
    from transferlab.data import build_splits, make_loaders

    register_configs()
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(HERE.parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*COMMON, *PROBE])
    run = load_config(cfg, [*COMMON, *PROBE])
    assert isinstance(run.dataset, FolderDatasetConfig)
    torch.manual_seed(0)
    backbone = build_backbone(run.backbone)
    size = backbone.input.size
    probe_features(backbone, size)
    splits = build_splits(run.dataset, AugmentConfig(), backbone.input, size)
    device = torch.device("cpu")
    trainer = TrainerConfig(batch_size=32)
    train_loader, val_loader = make_loaders(splits, trainer, 0, device)
    module = backbone.module.eval()

    started = time.perf_counter()
    with torch.no_grad():
        for loader in (train_loader, val_loader):
            for x, _ in loader:
                module(x)
    floor = time.perf_counter() - started

    head = nn.Linear(backbone.feature_dim, len(splits.classes))
    for p in module.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(1, EPOCHS + 1):
        train_loader.sampler.set_epoch(epoch)
        head.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(head(module(x).mean(dim=(2, 3))), y)
            loss.backward()
            optimizer.step()
        head.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((head(module(x).mean(dim=(2, 3))).argmax(1) == y).sum())
                total += len(y)
    plain = time.perf_counter() - started
    return {"floor_seconds": round(floor, 2), "plain_seconds": round(plain, 2),
            "plain_val_acc": round(correct / total, 4), "train": len(splits.train),
            "val": len(splits.val)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-two-stage", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()
    if not os.environ.get("TRANSFERLAB_DATA_DIR"):
        sys.exit("set TRANSFERLAB_DATA_DIR to the folder that holds hymenoptera/")
    results: dict = {"cpus": len(os.sched_getaffinity(0)), "epochs": EPOCHS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results.update(in_process_baselines(tmp))
        print(json.dumps(results), flush=True)

        probe = {}
        for name, extra, cache in (("uncached", ["trainer.feature_cache.mode=off"], "c0"),
                                   ("cold", [], "c1"), ("warm", [], "c1")):
            wall, run_dir = train(PROBE + extra, tmp / f"lp_{name}", tmp / cache)
            m = metrics(run_dir)
            probe[name] = {"wall_seconds": round(wall, 2),
                           "train_seconds": round(m["wall_seconds"], 2),
                           "val_acc": m["final"]["val_acc"], "val_loss": m["final"]["val_loss"],
                           "feature_cache": m.get("feature_cache")}
            print(name, json.dumps(probe[name]), flush=True)
        results["linear_probe"] = probe

        if not args.skip_two_stage:
            two = {}
            for name, extra, cache in (("uncached", ["trainer.feature_cache.mode=off"], "t0"),
                                       ("cached", [], "t1")):
                wall, run_dir = train(["freeze=two_stage", f"freeze.fine_tune_at={MIDDLE}"] +
                                      extra, tmp / f"two_{name}", tmp / cache)
                m = metrics(run_dir)
                two[name] = {"wall_seconds": round(wall, 2), "stages": stage_seconds(m),
                             "val_acc": m["final"]["val_acc"],
                             "feature_cache": m.get("feature_cache")}
                print(name, json.dumps(two[name]), flush=True)
            results["two_stage"] = two

        if not args.skip_sweep:
            sweep = {}
            for name, extra, cache in (("uncached", ["trainer.feature_cache.mode=off"], "s0"),
                                       ("cached", [], "s1")):
                wall, sweep_dir = train(SWEEP + extra, tmp / f"sweep_{name}", tmp / cache,
                                        multirun=True)
                jobs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
                accs = {p.name: metrics(p)["final"]["val_acc"] for p in jobs}
                sweep[name] = {"wall_seconds": round(wall, 2), "jobs": len(jobs),
                               "val_acc": accs}
                print(name, json.dumps(sweep[name]), flush=True)
            results["sweep"] = sweep
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
