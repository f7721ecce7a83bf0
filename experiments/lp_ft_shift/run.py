"""Does transferlab reproduce LP-FT's trade-off? Linear probe vs LP-FT vs full fine-tuning on
hymenoptera, in distribution and under corruptions, with the WiSE-FT curve.

    python experiments/lp_ft_shift/run.py             # everything (50 minutes on 2 CPU cores)
    python experiments/lp_ft_shift/run.py --seeds 0   # some of it
    python experiments/lp_ft_shift/run.py --report    # the tables from results.json

Every run is ``transferlab-train dataset=hymenoptera augment=none`` with the default backbone
(ImageNet EfficientNet-Lite0 at 224 px), Adam, batches of 32, 10 epochs in all, plus one
policy's overrides (``POLICIES``); the seed draws the head and the shuffling. Then, on the
weights each run ends with (``checkpoint=last``):

1. ``transferlab-eval ... corruptions=<CORRUPTIONS> severity=3``: clean val accuracy, image by
   image (kept in ``results.json`` for the intervals), and the accuracy under each of 14
   ImageNet-C corruptions at severity 3 (``glass_blur``, the 15th, is left out: 2.4 s per
   224 px image on this CPU, 6 minutes per evaluation);
2. for the policies that train the backbone, ``transferlab-eval ... wise=0:1:0.25
   corruptions=<WISE_CORRUPTIONS> severity=3``: the WiSE-FT curve between the weights before
   the first stage that trains the backbone and the final ones, clean and under one corruption
   of each family (noise, blur, weather, digital).

Results go to ``results.json`` beside this script after every run (a rerun skips what is
there: delete an entry to run it again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study_stats import interval_cell, last_correct, mean_sd, timed, verdict_lines  # noqa: E402

COMMON = ["dataset=hymenoptera", "augment=none", "trainer.progress=false"]
POLICIES = {
    "linear_probe": ["freeze=linear_probe", "trainer.epochs=10"],
    "lp_ft": ["freeze=lp_ft", "freeze.probe_epochs=5", "freeze.finetune_epochs=5"],
    "full": ["freeze=none", "trainer.epochs=10", "optimizer.lr=1e-4"],
}
CORRUPTIONS = ("gaussian_noise,shot_noise,impulse_noise,defocus_blur,motion_blur,zoom_blur,"
               "snow,frost,fog,brightness,contrast,elastic_transform,pixelate,jpeg_compression")
WISE_CORRUPTIONS = "gaussian_noise,motion_blur,fog,jpeg_compression"
RESULTS = HERE / "results.json"


def one(policy: str, seed: int, out: Path, cache: Path) -> dict:
    wall = timed(["transferlab-train", *COMMON, *POLICIES[policy], f"seed={seed}",
                  f"hydra.run.dir={out}", f"trainer.feature_cache.dir={cache}"])
    m = json.loads((out / "metrics.json").read_text())
    started = time.perf_counter()
    correct = last_correct(out, f"corruptions={CORRUPTIONS}", "severity=3")
    grid = json.loads((out / "eval.json").read_text())["corruptions"]
    row = {"seed": seed, "train_wall_seconds": round(wall, 1),
           "final_val_acc": m["final"]["val_acc"], "val_correct": correct,
           "corruption_accuracy": grid["per_corruption"],
           "corruption_mean_accuracy": grid["mean_accuracy"]}
    if policy != "linear_probe":
        timed(["transferlab-eval", f"run={out}", "checkpoint=last", "wise=0:1:0.25",
               f"corruptions={WISE_CORRUPTIONS}", "severity=3"])
        wise = json.loads((out / "eval.json").read_text())["wise"]
        row["wise"] = [{"alpha": p["alpha"], "accuracy": p["accuracy"],
                        "corruption_mean_accuracy": p["corruption_mean_accuracy"]}
                       for p in wise["points"]]
    row["eval_wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def report(results: dict) -> str:
    lines = ["| policy | clean val acc, 95 % CI (seeds × images) | mean of 14 corruptions, "
             "severity 3 | clean − corrupted | train wall time (median of seeds) |",
             "|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        clean = [r["final_val_acc"] for r in runs]
        corrupted = [r["corruption_mean_accuracy"] for r in runs]
        lines.append(f"| {name} | {interval_cell(runs)} | {mean_sd(corrupted)} | "
                     f"{statistics.mean(clean) - statistics.mean(corrupted):.3f} | "
                     f"{statistics.median(r['train_wall_seconds'] for r in runs):.0f} s |")
    lines += ["", "Per corruption (mean over seeds):", "",
              "| corruption | " + " | ".join(results) + " |",
              "|---|" + "---:|" * len(results)]
    names = next(iter(results.values()))[0]["corruption_accuracy"]
    for c in names:
        cells = [statistics.mean(r["corruption_accuracy"][c] for r in runs)
                 for runs in results.values()]
        lines.append(f"| {c} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    lines += ["", "Clean val accuracy, paired against linear_probe:", ""]
    lines += [f"- {line}" for line in verdict_lines(results, "linear_probe")]
    lines += ["", "WiSE-FT (mean over seeds; corrupted: the mean of " +
              WISE_CORRUPTIONS.replace(",", ", ") + " at severity 3):", "",
              "| policy | alpha | clean val acc | corrupted val acc |", "|---|---:|---:|---:|"]
    for name, runs in results.items():
        if "wise" not in runs[0]:
            continue
        for k, point in enumerate(runs[0]["wise"]):
            clean = statistics.mean(r["wise"][k]["accuracy"] for r in runs)
            bad = statistics.mean(r["wise"][k]["corruption_mean_accuracy"] for r in runs)
            lines.append(f"| {name} | {point['alpha']:g} | {clean:.3f} | {bad:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.report:
        with tempfile.TemporaryDirectory() as tmp:
            root, cache = Path(tmp), Path(tmp) / "cache"
            for seed in args.seeds:
                for policy in args.policies:
                    runs = results.setdefault(policy, [])
                    if any(r["seed"] == seed for r in runs):
                        continue
                    row = one(policy, seed, root / f"{policy}-{seed}", cache)
                    runs.append(row)
                    runs.sort(key=lambda r: r["seed"])
                    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
                    print({k: v for k, v in row.items() if k != "val_correct"}, flush=True)
    ordered = {name: results[name] for name in POLICIES if name in results}
    print(report(ordered))


if __name__ == "__main__":
    main()
