"""Early stopping + restore-best, MixUp and EMA on ``two_stage``, hymenoptera, 3 seeds.

    python experiments/training_features/run.py            # about 25 minutes on 2 CPU cores
    python experiments/training_features/run.py --seeds 0  # one seed
    python experiments/training_features/run.py --variants long long_early_stop  # some of them

Every run is ``transferlab-train dataset=hymenoptera freeze=two_stage`` (the default backbone,
ImageNet EfficientNet-Lite0 at 224 px; 5 epochs of the head on the frozen backbone, then 5 of
the head and ``blocks[-4:]`` at lr/10), plus one variant's overrides:

- ``baseline``: nothing more;
- ``early_stop``: ``trainer.early_stopping.patience=2`` (monitor val_loss, restore_best);
- ``mixup``: ``augment.mixup_alpha=0.2`` (the feature cache is then off: random inputs);
- ``ema``: ``trainer.ema.decay=0.99 trainer.ema.warmup=true`` (reported: the EMA weights' final
  val acc next to the raw weights');
- ``long``: a 3x longer budget, 15 + 15 epochs (``freeze.head_epochs=15
  freeze.finetune_epochs=15``), the setting early stopping is for;
- ``long_early_stop``: the same budget with ``trainer.early_stopping.patience=2``.

The runs go seed by seed, the four variants one after the other within a seed, so that a drift
in the machine's speed touches every variant alike. A first, untimed, 1+1-epoch run fills the
feature cache (the frozen parts' outputs are the same for every run), so every timed run reads
a warm cache, as runs of a sweep do. Results: ``results.json`` beside this script, and a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study_stats import interval_cell, last_correct, mean_sd, timed, verdict_lines  # noqa: E402

COMMON = ["dataset=hymenoptera", "freeze=two_stage", "trainer.progress=false"]
VARIANTS = {
    "baseline": [],
    "early_stop": ["trainer.early_stopping.patience=2"],
    "mixup": ["augment.mixup_alpha=0.2"],
    "ema": ["trainer.ema.decay=0.99", "trainer.ema.warmup=true"],
    "long": ["freeze.head_epochs=15", "freeze.finetune_epochs=15"],
    "long_early_stop": ["freeze.head_epochs=15", "freeze.finetune_epochs=15",
                        "trainer.early_stopping.patience=2"],
}


def train(args: list[str], out: Path, cache: Path) -> tuple[float, dict]:
    """Run transferlab-train; (wall seconds of the whole process, its metrics.json)."""
    wall = timed(["transferlab-train", *COMMON, *args, f"hydra.run.dir={out}",
                  f"trainer.feature_cache.dir={cache}"])
    return wall, json.loads((out / "metrics.json").read_text())


def summary(m: dict, wall: float) -> dict:
    final, best = m["final"], m["best"]
    out = {"wall_seconds": round(wall, 1), "train_seconds": round(m["wall_seconds"], 1),
           "final_val_acc": final["val_acc"], "final_val_loss": round(final["val_loss"], 5),
           "best_val_acc": best["val_acc"], "epochs_trained": len(m["history"])}
    if "val_acc_ema" in final:
        out["final_val_acc_ema"] = final["val_acc_ema"]
    # the weights the run ends with: a last stage stopped early with restore_best ends with
    # its best epoch's weights, not its last epoch's
    end = final
    if m.get("stopped_early"):
        out["stopped_early"] = [{k: s[k] for k in ("stage", "epoch", "best_epoch")}
                                for s in m["stopped_early"]]
        last = m["stopped_early"][-1]
        if last["stage"] == m["history"][-1]["stage"] and last.get("restored"):
            end = next(r for r in m["history"] if r["epoch"] == last["best_epoch"])
    out["end_val_acc"] = end["val_acc"]
    return out


def table(results: dict) -> str:
    rows = ["| variant | val acc of the weights it ends with | last epoch's val acc | best epoch's "
            "val acc | EMA weights' final val acc | epochs trained | wall time (process) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    if any("val_correct" in r for runs in results.values() for r in runs):
        rows[0] = rows[0].replace("| last epoch's val acc |", "| last epoch's val acc | its "
                                  "95 % CI (seeds × images) |")
        rows[1] += "---:|"
    for name, runs in results.items():
        ema = [r["final_val_acc_ema"] for r in runs if "final_val_acc_ema" in r]
        rows.append(
            f"| {name} | {mean_sd([r.get('end_val_acc', r['final_val_acc']) for r in runs], 4)} | "
            f"{mean_sd([r['final_val_acc'] for r in runs], 4)} | "
            + (f"{interval_cell(runs)} | " if "CI" in rows[0] else "") +
            f"{mean_sd([r['best_val_acc'] for r in runs], 4)} | "
            f"{mean_sd(ema, 4) if ema else ''} | "
            f"{' / '.join(str(r['epochs_trained']) for r in runs)} | "
            f"{statistics.mean(r['wall_seconds'] for r in runs):.1f} s |")
    if "CI" not in rows[0] or "baseline" not in results:
        return "\n".join(rows)
    rows += ["", "Each variant's last-epoch weights against the baseline's (paired by seed and "
             "image):", ""]
    rows += [f"- {line}" for line in verdict_lines(results, "baseline")]
    ema = {"baseline": results["baseline"], **{
        f"{name} (EMA weights)": [{**r, "val_correct": r["val_correct_ema"]} for r in runs]
        for name, runs in results.items() if all("val_correct_ema" in r for r in runs)}}
    rows += [f"- {line}" for line in verdict_lines(ema, "baseline")]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--report", action="store_true", help="only the table, from results.json")
    args = parser.parse_args()
    out = HERE / "results.json"
    if args.report:
        print(table(json.loads(out.read_text())))
        return
    # every run's row goes into the file as soon as it is there (a run of some variants or
    # seeds replaces those rows, and keeps the others)
    results = json.loads(out.read_text()) if out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        train(["freeze.head_epochs=1", "freeze.finetune_epochs=1"], root / "warmup", cache)
        for seed in args.seeds:
            for name in args.variants:
                run_dir = root / f"{name}-{seed}"
                wall, m = train([*VARIANTS[name], f"seed={seed}"], run_dir, cache)
                row = {"seed": seed, **summary(m, wall), "val_correct": last_correct(run_dir)}
                if "final_val_acc_ema" in row:
                    row["val_correct_ema"] = last_correct(run_dir, "weights=ema")
                rows = [r for r in results.get(name, []) if r["seed"] != seed] + [row]
                results[name] = sorted(rows, key=lambda r: r["seed"])
                results = {v: results[v] for v in VARIANTS if v in results}
                out.write_text(json.dumps(results, indent=2) + "\n")
                print(json.dumps({k: v for k, v in row.items() if "correct" not in k}),
                      flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
