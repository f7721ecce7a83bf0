"""What a halving sweep saves: the same grid run exhaustively and with ``hydra/sweeper=halving``.

    python experiments/halving/run.py digits      # 9 configurations, both ways (minutes)
    python experiments/halving/run.py --report    # README's table from results.json

The digits grid: 3 learning rates x 3 freeze policies (``linear_probe`` 9 epochs;
``two_stage`` 3 + 6; ``lp_ft`` 3 + 6: each policy's own epoch keys on one command line), the
default backbone (ImageNet EfficientNet-Lite0) with digits' 8x8 scans upsampled to 32 px (not
64: a 2-core CPU budget, as in ``which_policy``), no augmentation (the frozen
stages read the feature cache), ``trainer.deterministic=true``. Both sweeps rank by the best
validation accuracy of digits' validation split. The exhaustive sweep is a plain ``-m``; the
halving sweep is eta 3 from 1 epoch. Both run in one process each, one after the other, so
their wall times compare on the same machine, after a short warm-up sweep that fills the
feature cache, so that neither pays for it.

Results go to ``results.json`` beside this script (one entry per study, replaced by a rerun).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
COMMON = ["augment=none", "trainer.progress=false", "trainer.deterministic=true"]
STUDIES = {
    "digits": ["dataset=digits", "dataset.image_size=32", "optimizer.lr=3e-2,3e-3,3e-4",
               "freeze=linear_probe,two_stage,lp_ft", "trainer.epochs=9",
               "freeze.head_epochs=3", "freeze.probe_epochs=3", "freeze.finetune_epochs=6"],
}
WARMUP = ["trainer.epochs=1", "freeze.head_epochs=1", "freeze.probe_epochs=1",
          "freeze.finetune_epochs=1"]
WARMUP_KEYS = [w.split("=")[0] for w in WARMUP]
HALVING = ["hydra/sweeper=halving", "hydra.sweeper.eta=3", "hydra.sweeper.min_epochs=1"]


def sweep(args: list[str], out: Path) -> float:
    """``transferlab-train -m <args>`` into ``out``; its wall time."""
    cmd = ["transferlab-train", "-m", *COMMON, *args, f"hydra.sweep.dir={out}"]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def jobs(out: Path) -> dict[str, dict]:
    """Every job's record under ``out``, by its overrides."""
    found = {}
    for path in sorted(out.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        key = " ".join(o for o in overrides if o.split("=")[0] in ("optimizer.lr", "freeze"))
        found[key] = {"status": record["status"], "epochs": len(record["history"]),
                      "best_val_acc": (record.get("best") or {}).get("val_acc"),
                      "history": [round(e["val_acc"], 4) for e in record["history"]],
                      "resumes": len(record.get("resumes", []))}
    return found


def run_study(name: str) -> dict:
    grid = STUDIES[name]
    with tempfile.TemporaryDirectory(prefix="halving-") as tmp:
        root = Path(tmp)
        # fill the feature cache first (each policy for 1 + 1 epochs: the frozen backbone's
        # and the frozen prefix's outputs), so that neither sweep pays for it
        sweep([g for g in grid if g.split("=")[0].split(".")[0] in ("dataset", "freeze")
               and g.split("=")[0] not in WARMUP_KEYS] + WARMUP,
              root / "warmup")
        exhaustive_wall = sweep(grid, root / "exhaustive")
        halving_wall = sweep([*HALVING, *grid], root / "halving")
        exhaustive, halved = jobs(root / "exhaustive"), jobs(root / "halving")
        record = json.loads((root / "halving" / "halving.json").read_text())
    pick = max(exhaustive, key=lambda k: (exhaustive[k]["best_val_acc"], -list(exhaustive)
                                          .index(k)))
    winner = " ".join(record["winner"]["overrides"])
    return {
        "grid": grid, "halving": HALVING,
        "exhaustive": {"wall_s": round(exhaustive_wall, 1),
                       "epochs": sum(j["epochs"] for j in exhaustive.values()),
                       "pick": pick, "pick_val_acc": exhaustive[pick]["best_val_acc"],
                       "jobs": exhaustive},
        "halving_run": {"wall_s": round(halving_wall, 1), "epochs": record["epochs_trained"],
                        "pick": winner, "pick_val_acc": record["winner"]["value"],
                        "rungs": record["rungs"], "jobs": halved},
    }


def report(results: dict) -> str:
    lines = ["| study | sweep | epochs trained | wall time | pick | its best val acc |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for label, key in (("exhaustive", "exhaustive"), ("halving (eta 3)", "halving_run")):
            s = r[key]
            lines.append(f"| {name} | {label} | {s['epochs']} | {s['wall_s']:.0f} s | "
                         f"`{s['pick']}` | {s['pick_val_acc']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", choices=sorted(STUDIES))
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.study:
        results[args.study] = run_study(args.study)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
