"""How far the tool's own choices go: rank, then halve on the training folds, then held-out val.

    python experiments/rank/pick.py hymenoptera          # all 244 training images
    python experiments/rank/pick.py hymenoptera_10pct    # 10 % of them (24 images)
    python experiments/rank/pick.py --report             # README's table from picks.json

Every choice is made on the training split; only the held-out runs that end steps 3 to 7
read the val split.

1. **Rank.** ``transferlab-rank`` scores the three offline backbones (LogME, its default) on the
   training images and suggests a halving sweep (``next_halving`` in its ``rank.json``: the top
   two backbones x ``freeze=linear_probe,top_k``).
2. **Halve.** That suggested command, as it is, plus what it leaves to the user: a learning-rate
   grid (``LRS``), a 10-epoch plan, rungs at epochs 2, 4 and 10 with eta 3, and a 3-fold split
   of the training images (``dataset.folds=3 dataset.fold=range(0,3)``) that every
   configuration is ranked on (its mean over the folds).
3. **Held out.** The sweep's winner trains on the whole training split with seeds 0, 1 and 2;
   its number is the val accuracy of the weights each run ends with, with the two-level
   bootstrap interval over seeds and images (``study_stats.interval_cell``).
4. **Further** (``FURTHER``): what the suggested sweep leaves fixed and a longer plan can use:
   the winner again for 20 epochs with ``augment=none,flip,trivialaugment``, every one to the
   end (an early rung would favour no augmentation, which pays off late), ranked on the same
   folds; its winner on held-out val as in 3. Added after step 3 fell short of the bar on
   hymenoptera: that decision read val, the choice within the step does not.
5. **Larger and deeper** (``LARGER``): step 3's winner again, 10 epochs without augmentation
   (the frozen prefix reads the feature cache), over ``dataset.image_size=260,300,340`` x
   ``freeze.k=2,5`` (where the winner's policy has ``k``), halving on the same folds as in 2;
   its winner on val as in 3. Added, as step 4 was, after step 4 fell short of the bar on val.
6. **Every block** (``FULL``): step 3's backbone fully fine-tuned (``freeze=none``) under a
   cosine schedule, 10 epochs, over ``optimizer.lr=1e-3,3e-4,1e-4`` x ``augment=none,flip``,
   halving on the same folds as in 2; its winner on val as in 3. Added, as steps 4 and 5
   were, after step 5 fell short of the bar on val; so only on hymenoptera (``SHORT_OF_BAR``).
7. **Test-time augmentation** (``TTA``): step 3's winner, evaluated with ``tta=none``, ``flip``,
   ``five_crop`` and ``ten_crop``. Each mode is scored by the mean accuracy of the winner's
   three fold runs of step 2 (their last weights, on the training images each fold held out);
   the best (the first listed among equals) evaluates step 3's held-out runs' last weights on
   val. Nothing trains. Added after step 6 fell short, like it only on hymenoptera.

Each step is kept under ``--root`` (default ``outputs/rank-pick/<data>``) as it ends: a stopped
run goes on from the step it was in. Results go to ``picks.json`` beside this script.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run import COMMON, ZOO  # noqa: E402  (the rank study's, beside this script)
from run import DATASETS as RANK_DATASETS  # noqa: E402
from study_stats import (  # noqa: E402
    applicable,
    held_out_record,
    interval_cell,
    kept,
    last_correct,
    seeds_held_out,
    sweep,
    timed,
)

from transferlab.run.predictions import EVAL_PREDICTIONS, load_predictions  # noqa: E402

RESULTS = HERE / "picks.json"
TARGETS = {"hymenoptera": 0.975, "hymenoptera_10pct": 0.94}  # the held-out val bars
DATASETS = {name: RANK_DATASETS[name] for name in TARGETS}
LRS = "optimizer.lr=3e-3,1e-3,3e-4"
PLAN = ["trainer.epochs=10", "hydra.sweeper.eta=3", "hydra.sweeper.rungs=[2,4,10]"]
FOLDS = ["dataset.folds=3", "dataset.fold=range(0,3)"]
FURTHER = ["hydra/sweeper=halving", "hydra.sweeper.rungs=[20]", "trainer.epochs=20",
           "augment=none,flip,trivialaugment"]
LARGER = ["hydra/sweeper=halving", "hydra.sweeper.eta=3", "hydra.sweeper.rungs=[2,4,10]",
          "dataset.image_size=260,300,340", "freeze.k=2,5"]
SHORT_OF_BAR = {"hymenoptera"}  # steps 6 and 7: only where steps 3 to 5 fell short on val
TTA = ["none", "flip", "five_crop", "ten_crop"]  # step 7's choices; among equals, the first
FULL = ["hydra/sweeper=halving", "hydra.sweeper.eta=3", "hydra.sweeper.rungs=[2,4,10]",
        "optimizer.lr=1e-3,3e-4,1e-4", "augment=none,flip"]


def ranking(data: list[str], root: Path) -> dict:
    """One ``transferlab-rank`` call; its table, the halving sweep it suggests, its wall time."""
    cmd = ["transferlab-rank", *data, f"trainer.feature_cache.dir={root / 'feature_cache'}",
           f"backbones={','.join(ZOO)}", f"output={root / 'rank'}"]
    wall = timed(cmd)
    report = json.loads((root / "rank" / "rank.json").read_text())
    return {"wall_s": round(wall, 1), "table": report["table"],
            "next_halving": report["next_halving"]}


def halving(args: list[str], out: Path) -> dict:
    """A halving sweep of ``args`` on the folds of the training images; its record."""
    wall = sweep([*args, *FOLDS], out)
    record = json.loads((out / "halving.json").read_text())
    return {"wall_s": round(wall, 1), "epochs": record["epochs_trained"],
            "jobs": sum(len(c["runs"]) for c in record["configurations"]),
            "configurations": record["configurations"], "winner": record["winner"]}


def seed_ensemble(out: Path) -> int:
    """Val errors of the held-out seeds under ``out`` as one model: the mean of their
    probabilities for each image's true class, from the last weights' predictions
    (``transferlab-eval``'s, written for ``val_correct``). With two classes an image is right
    where that mean is above 0.5 (a tie counts as an error)."""
    runs = [load_predictions(path) for path in sorted(out.glob(f"*/{EVAL_PREDICTIONS}"))]
    if len({len(r.targets) for r in runs}) != 1 or len({*runs[0].targets.tolist()}) > 2:
        raise SystemExit(f"{out}: the seed ensemble needs two classes and one val split")
    return int((sum(r.label_prob for r in runs) / len(runs) <= 0.5).sum())


def settle(root: Path, label: str, grid: list[str], fixed: list[str], base: list[str]) -> dict:
    """One step: the halving sweep of ``grid`` on the folds, then its winner (after ``base``,
    the overrides it refines) with ``fixed`` on held-out val, 3 seeds. Both parts are kept
    under ``root`` as ``<label>_step.json`` and ``<label>_held_out_step.json``."""
    swept = kept(root / f"{label}_step.json", lambda: halving(grid, root / label))
    pick = [*base, *swept["winner"]["overrides"]]
    held = kept(root / f"{label}_held_out_step.json", lambda: seeds_held_out(
        fixed, pick, root / f"{label}_held_out", correctness=True))
    held["ensemble_errors"] = seed_ensemble(root / f"{label}_held_out")
    print(label, json.dumps({"pick": pick, "cv_mean": swept["winner"]["value"],
                             **{k: v for k, v in held.items() if k != "val_correct"}}),
          flush=True)
    return {"sweep": [*grid, *FOLDS], "halving": swept, "pick": pick,
            "cv_mean": swept["winner"]["value"], "held_out": held}


def last_weights(run: Path, out: Path, mode: str) -> str:
    """``run``'s last weights on its val split with ``tta=mode``: the correctness bits. The
    evaluation's files go to ``out``, so the kept run's own evaluation stays as it was."""
    return last_correct(run, f"tta={mode}", "mistakes=false", output=out)


def accuracy(correct: str) -> float:
    return correct.count("1") / len(correct)


def tta_pick(root: Path, label: str, swept: dict) -> dict:
    """Step 7: the test-time augmentation (``TTA``) of step ``label``'s winner (``swept``: its
    halving record). Each mode is scored by the mean accuracy of the winner's fold runs (the
    last weights, on the training images each fold held out); the best mode then evaluates
    the held-out runs' last weights on val."""
    folds = next(c["runs"] for c in swept["configurations"]
                 if c["config"] == swept["winner"]["config"])

    def on_folds(mode: str) -> float:
        return statistics.mean(
            accuracy(last_weights(root / label / run, root / "tta_folds" / run, mode))
            for run in folds)

    started = time.perf_counter()
    means = {mode: on_folds(mode) for mode in TTA}
    folds_s = time.perf_counter() - started
    mode = max(TTA, key=means.__getitem__)
    started = time.perf_counter()
    runs = sorted(p.parent for p in (root / f"{label}_held_out").glob("*/metrics.json"))
    correct = [last_weights(run, root / "tta_held_out" / run.name, mode) for run in runs]
    held = held_out_record(time.perf_counter() - started, [accuracy(c) for c in correct],
                           correct)
    return {"folds": means, "mode": mode, "folds_s": round(folds_s, 1), "held_out": held}


def run_pick(name: str, root: Path) -> dict:
    data = DATASETS[name]
    root.mkdir(parents=True, exist_ok=True)
    ranked = kept(root / "rank_step.json", lambda: ranking(data, root))
    # the suggested command without its program and -m: the sweep's own overrides
    suggested = shlex.split(ranked["next_halving"])[2:]
    fixed = [o for o in [*suggested, *COMMON, *PLAN]
             if "," not in o and not o.startswith(("hydra", "backbone=", "freeze="))]
    first = settle(root, "halving", [*suggested, *COMMON, LRS, *PLAN], fixed, [])
    winner = first["pick"]
    # step 4: the same winner, longer and augmented (the epochs are FURTHER's)
    longer = [o for o in fixed if not o.startswith("trainer.epochs=")]
    further = settle(root, "further", [*longer, *winner, *FURTHER],
                     [*longer, "trainer.epochs=20"], winner)
    # step 5: larger inputs and more blocks (freeze.k only where the winner's policy has it:
    # not a linear probe's), 10 epochs, cached
    larger = settle(root, "larger", [*fixed, *winner, *applicable(LARGER, winner)], fixed,
                    winner)
    result = {"data": data, "rank": ranked, "suggested": ranked["next_halving"], **first,
              "target": TARGETS[name], "further": further, "larger": larger}
    if name in SHORT_OF_BAR:
        # step 6: the winner's backbone, every block, a cosine schedule
        backbone = [o for o in winner if o.startswith("backbone=")]
        every = [*backbone, "freeze=none"]
        result["full"] = settle(root, "full", [*fixed, *every, "scheduler=cosine", *FULL],
                                [*fixed, "scheduler=cosine"], every)
        # step 7: step 3's winner with the test-time augmentation its folds prefer
        tta = kept(root / "tta_step.json",
                   lambda: tta_pick(root, "halving", first["halving"]))
        tta["held_out"]["ensemble_errors"] = seed_ensemble(root / "tta_held_out")
        result["tta"] = {**tta, "pick": [*winner, f"tta={tta['mode']}"],
                         "cv_mean": tta["folds"][tta["mode"]]}
    return result


def report(results: dict) -> str:
    lines = ["| data | LogME's order | step | pick (3-fold CV on the training images) | its CV "
             "mean | held-out val, 3 seeds (mean ± sd) | with its 95 % interval | val errors "
             "(each seed; the three as one) | the bar | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        order = " > ".join(row[1].removeprefix("efficientnet_") for row in r["rank"]["table"][1:])
        steps = [("the suggested sweep", r, f"{r['rank']['wall_s']:.0f} s rank + "),
                 ("20 epochs, augmentation", r.get("further"), ""),
                 ("larger inputs, more blocks", r.get("larger"), ""),
                 ("every block, cosine schedule", r.get("full"), ""),
                 ("test-time augmentation", r.get("tta"), "")]
        for label, step, rank_s in (s for s in steps if s[1]):
            h = step["held_out"]
            runs = [{"val_correct": bits} for bits in h["val_correct"]]
            met = "met" if h["mean"] >= r["target"] else "not met"
            errors = f"{', '.join(str(b.count('0')) for b in h['val_correct'])}; " \
                     f"{h['ensemble_errors']}"
            wall = (f"{step['halving']['wall_s']:.0f} s sweep + {h['wall_s']:.0f} s seeds"
                    if "halving" in step else  # step 7 trains nothing: it evaluates
                    f"{step['folds_s']:.0f} s on the folds + {h['wall_s']:.0f} s on val")
            lines.append(f"| {name} | {order} | {label} | `{' '.join(step['pick'])}` | "
                         f"{step['cv_mean']:.4f} | {h['mean']:.4f} ± {h['sd']:.4f} | "
                         f"{interval_cell(runs)} | {errors} | {r['target']:.3f}: {met} | {rank_s}"
                         f"{wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", choices=sorted(DATASETS))
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("outputs/rank-pick"),
                        help="where the study keeps its runs and finished steps (a rerun goes "
                             "on from there)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.data:
        results[args.data] = run_pick(args.data, args.root / args.data)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
