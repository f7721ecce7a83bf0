"""What a halving sweep saves: the same grid run exhaustively and with ``hydra/sweeper=halving``.

    python experiments/halving/run.py digits      # 9 configurations, both ways (minutes)
    python experiments/halving/run.py hymenoptera # 24 configurations x 3 folds (about 1.5 h)
    python experiments/halving/run.py --report    # README's table from results.json

The digits grid: 3 learning rates x 3 freeze policies (``linear_probe`` 9 epochs;
``two_stage`` 3 + 6; ``lp_ft`` 3 + 6: each policy's own epoch keys on one command line), the
default backbone (ImageNet EfficientNet-Lite0) with digits' 8x8 scans upsampled to 32 px (not
64: a 2-core CPU budget, as in ``which_policy``), no augmentation (the frozen
stages read the feature cache), ``trainer.deterministic=true``. Every sweep ranks by the best
validation accuracy of digits' validation split. The exhaustive sweep is a plain ``-m``; the
halving sweeps (``HALVING``) are eta 3 from epoch 1, and eta 3 on rungs that start after the
shared head stage. Each sweep runs in one process, one after the other, so their wall times
compare on the same machine, after a short warm-up sweep that fills the feature cache, so
that none pays for it.

The hymenoptera study (``run_cv_study``) is the issue's: 24 configurations (3 learning rates x
linear_probe, two_stage at 3 depths, lp_ft, surgical at 3 blocks), 10-epoch plans, at 224 px,
each ranked by its mean over a 3-fold split of the *training* images. Both arms are sweeps of
``hydra/sweeper=halving``: the exhaustive one with a single rung (every configuration to the end
of its plan: the same jobs as ``-m``, with the same ranking), the halving one with eta 3 on the
rungs ``CV_RUNGS``. The halving arm runs first, on an empty feature cache (it pays the
extraction; the exhaustive arm reads the cache it filled: a bias against halving). Then each
arm's pick trains on the whole training split with seeds 0, 1, 2 and is measured on the held-out
validation split, which no choice looked at (the weights each run ends with).

Results go to ``results.json`` beside this script (one entry per study, replaced by a rerun).
The k-fold study keeps its sweeps under ``--root`` (default ``outputs/halving-study/<study>``)
and each finished step there: stopped, it goes on from the step it was in (delete the folder to
start over).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study_stats import kept, seeds_held_out, sweep  # noqa: E402

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
# the halving sweeps: eta 3 from epoch 1 (the sweeper's defaults), and rungs that start after
# the head stage the three policies share (epochs 1-3 are the same training for all three)
CV_STUDIES = {
    "hymenoptera": ["dataset=hymenoptera", "optimizer.lr=1e-2,3e-3,1e-3",
                    "freeze=linear_probe,two_stage,lp_ft,surgical", "freeze.fine_tune_at=14,9,5",
                    "freeze.block=17,12,6", "trainer.epochs=10", "freeze.head_epochs=1",
                    "freeze.probe_epochs=1", "freeze.finetune_epochs=9"],
}
HEAD_ONLY = ("head", "probe")  # the stages of these policies that train the head alone
FOLDS = ["dataset.folds=3", "dataset.fold=range(0,3)"]
# every policy trains the head alone for epoch 1, so the first rung is after epoch 2 (the
# first that tells the policies apart); eta 3 cuts 24 -> 8 -> 2
CV_RUNGS = [2, 4, 10]
CV_KEYS = ("optimizer.lr", "freeze", "freeze.fine_tune_at", "freeze.block", "dataset.fold")
HALVING = {"from epoch 1": ["hydra/sweeper=halving", "hydra.sweeper.eta=3",
                            "hydra.sweeper.min_epochs=1"],
           "rungs 4, 6, 9": ["hydra/sweeper=halving", "hydra.sweeper.eta=3",
                             "hydra.sweeper.rungs=[4,6,9]"]}


def jobs(out: Path, keys: tuple[str, ...] = ("optimizer.lr", "freeze")) -> dict[str, dict]:
    """Every job's record under ``out``, by its overrides (those of ``keys``)."""
    found = {}
    for path in sorted(out.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        key = " ".join(o for o in overrides if o.split("=")[0].lstrip("+") in keys)
        found[key] = {"status": record["status"], "epochs": len(record["history"]),
                      # epochs that train backbone blocks (every stage of these policies
                      # but the head-only ones: two_stage's head, lp_ft's probe, linear_probe)
                      "finetune_epochs": sum(e["stage"] not in HEAD_ONLY
                                             for e in record["history"]),
                      "best_val_acc": (record.get("best") or {}).get("val_acc"),
                      "history": [round(e["val_acc"], 4) for e in record["history"]],
                      "resumes": len(record.get("resumes", [])),
                      "epoch_s": round(sum(e["seconds"] for e in record["history"]), 1)}
    return found


def summary(wall: float, found: dict[str, dict], pick: str, value: float) -> dict:
    return {"wall_s": round(wall, 1), "epochs": sum(j["epochs"] for j in found.values()),
            "finetune_epochs": sum(j["finetune_epochs"] for j in found.values()),
            "epoch_s": round(sum(j["epoch_s"] for j in found.values()), 1),
            "pick": pick, "pick_val_acc": value, "jobs": found}


def run_study(name: str) -> dict:
    grid = STUDIES[name]
    out = {"grid": grid, "halving": HALVING}
    with tempfile.TemporaryDirectory(prefix="halving-") as tmp:
        root = Path(tmp)
        # fill the feature cache first (each policy for 1 + 1 epochs: the frozen backbone's
        # and the frozen prefix's outputs), so that no sweep pays for it
        sweep([*COMMON, *(g for g in grid if g.split("=")[0].split(".")[0] in ("dataset", "freeze")
               and g.split("=")[0] not in WARMUP_KEYS), *WARMUP], root / "warmup")
        wall = sweep([*COMMON, *grid], root / "exhaustive")
        found = jobs(root / "exhaustive")
        pick = max(found, key=lambda k: (found[k]["best_val_acc"], -list(found).index(k)))
        out["exhaustive"] = summary(wall, found, pick, found[pick]["best_val_acc"])
        for i, (label, args) in enumerate(HALVING.items()):
            wall = sweep([*COMMON, *args, *grid], root / f"halving{i}")
            record = json.loads((root / f"halving{i}" / "halving.json").read_text())
            out[label] = {**summary(wall, jobs(root / f"halving{i}"),
                                    " ".join(record["winner"]["overrides"]),
                                    record["winner"]["value"]),
                          "rungs": record["rungs"]}
    return out


def held_out(grid: list[str], pick: list[str], out: Path) -> dict:
    """``pick`` trained on the whole training split with seeds 0, 1, 2 (study_stats)."""
    return seeds_held_out([*COMMON, *[g for g in grid if "," not in g and g.split("=")[0] in
                                      ("dataset", "dataset.image_size", "trainer.epochs",
                                       "freeze.head_epochs", "freeze.probe_epochs",
                                       "freeze.finetune_epochs")]], pick, out)


def run_cv_study(name: str, root: Path) -> dict:
    """Both arms on the k-fold split of the training images, then the picks on held-out val.

    Each step's result is kept in ``root`` as it ends (``<step>.json``), so a rerun after a
    stop skips what is done and goes on from the next step."""
    grid = CV_STUDIES[name]
    out = {"grid": grid + FOLDS, "rungs": CV_RUNGS}
    root.mkdir(parents=True, exist_ok=True)

    def arm(label: str, args: list[str]) -> dict:
        wall = sweep([*COMMON, *args, *grid, *FOLDS], root / label)
        record = json.loads((root / label / "halving.json").read_text())
        return {"wall_s": round(wall, 1), "rungs": record["rungs"],
                "configurations": record["configurations"], "winner": record["winner"]}

    arms = {"halving": ["hydra/sweeper=halving", "hydra.sweeper.eta=3",
                        f"hydra.sweeper.rungs=[{','.join(map(str, CV_RUNGS))}]"],
            "exhaustive": ["hydra/sweeper=halving", f"hydra.sweeper.rungs=[{CV_RUNGS[-1]}]"]}
    for label, args in arms.items():
        ran = kept(root / f"{label}.json", lambda label=label, args=args: arm(label, args))
        # the counts are read from the sweep's records, never kept: they follow the script
        out[label] = {**summary(ran["wall_s"], jobs(root / label, CV_KEYS),
                                " ".join(ran["winner"]["overrides"]), ran["winner"]["value"]),
                      "rungs": ran["rungs"], "configurations": ran["configurations"],
                      "winner": ran["winner"]["overrides"]}
        print(label, json.dumps({k: v for k, v in out[label].items()
                                 if k in ("wall_s", "epochs", "finetune_epochs", "pick",
                                          "pick_val_acc")}), flush=True)
    picks = {label: out[label]["winner"] for label in arms}
    for i, pick in enumerate(dict.fromkeys(map(tuple, picks.values()))):
        result = kept(root / f"held_out{i}.json", lambda i=i, pick=pick:
                      held_out(grid, list(pick), root / f"held_out{i}"))
        for label in arms:
            if tuple(picks[label]) == pick:
                out[label]["held_out"] = result
        print("held out", " ".join(pick), json.dumps(result), flush=True)
    return out


def report(results: dict) -> str:
    lines = ["| study | sweep | epochs trained | of them fine-tuning | wall time | pick | its "
             "best val acc |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for label in ("exhaustive", *HALVING):
            s = r[label]
            lines.append(f"| {name} | {label} | {s['epochs']} | {s['finetune_epochs']} | "
                         f"{s['wall_s']:.0f} s | `{s['pick']}` | {s['pick_val_acc']:.4f} |")
    return "\n".join(lines)


def replay(root: Path, rungs: list[int], eta: int = 3) -> list[str]:
    """The halving arm's decisions again, from the exhaustive arm's records (every job's
    epoch-by-epoch history; resume is exact, so a paused and resumed run has the same one):
    once with a plain mean over folds, as the sweeper had it when the study ran, and once
    with the sweeper's exact mean (``mean_of``). No training: it reads the records, and ranks
    with the sweeper's own rung arithmetic (``HalvingPlan``) and job value (``run_value``)."""
    from transferlab.tools.halving import HalvingPlan, mean_of, ranked, run_value, tied_at_cut

    record = json.loads((root / "exhaustive" / "halving.json").read_text())
    statuses = {c["config"]: [json.loads((root / "exhaustive" / r / "metrics.json").read_text())
                              for r in c["runs"]] for c in record["configurations"]}
    names = {c["config"]: " ".join(c["overrides"]) for c in record["configurations"]}
    plan = HalvingPlan(eta, 1, rungs, None)
    lines = []
    for label, mean in (("plain mean", lambda v: sum(v) / len(v)), ("exact mean", mean_of)):
        alive = sorted(statuses)
        for rung, budget in enumerate(rungs):
            keep = 1 if plan.is_last(rung, len(alive)) else plan.going_on(len(alive))
            values = [mean([run_value(s, "val_acc", "max", budget) for s in statuses[c]])
                      for c in alive]
            order = ranked(values, "max")
            tied = tied_at_cut(values, order, keep)
            alive = sorted(alive[i] for i in order[:keep])
            went = ", ".join(f"`{names[c]}`" for c in alive) if keep <= 2 else \
                f"{keep} configurations"
            lines.append(f"{label}: rung {rung} (epoch {budget}): {went} went on"
                         f"{f'; {tied} tied at the cut' if tied else ''}")
    return lines


def _held(h: dict | None) -> str:
    if not h:
        return "n/a"
    return (f"{h['mean']:.4f} ± {h['sd']:.4f} ("
            + ", ".join(f"{v:.4f}" for v in h["final_val_acc"]) + ")")


def cv_report(r: dict) -> str:
    """The k-fold study: both arms, then every configuration's exhaustive CV mean beside the
    rung halving took it to."""
    lines = ["| arm | epochs trained | of them fine-tuning | seconds in epochs | wall time | "
             "pick | its 3-fold CV mean | pick's held-out val acc, 3 seeds (mean ± sd) |",
             "|---|---|---|---|---|---|---|---|"]
    for label in ("exhaustive", "halving"):
        s = r[label]
        lines.append(f"| {label} | {s['epochs']} | {s['finetune_epochs']} | "
                     f"{s['epoch_s']:.0f} s | {s['wall_s']:.0f} s | `{s['pick']}` | "
                     f"{s['pick_val_acc']:.4f} | {_held(s.get('held_out'))} |")
    reached = {tuple(c["overrides"]): c for c in r["halving"]["configurations"]}
    full = sorted(r["exhaustive"]["configurations"], key=lambda c: -(c["values"][-1] or -1))
    lines += ["", "| configuration | exhaustive: 3-fold CV mean at epoch 10 | halving: "
              "CV mean at each rung it reached |", "|---|---|---|"]
    budgets = r["rungs"]
    for c in full:
        h = reached[tuple(c["overrides"])]
        steps = ", ".join(f"{v:.4f} (epoch {budgets[i]})" for i, v in enumerate(h["values"])
                          if v is not None)
        lines.append(f"| `{' '.join(c['overrides'])}` | {c['values'][-1]:.4f} | {steps} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", choices=sorted([*STUDIES, *CV_STUDIES]))
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--replay", action="store_true",
                        help="the k-fold study's halving decisions again from the exhaustive "
                             "arm's records (needs --root's sweeps)")
    parser.add_argument("--root", type=Path, default=Path("outputs/halving-study"),
                        help="where the k-fold study keeps its sweeps and finished steps "
                             "(a rerun goes on from there)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.study:
        results[args.study] = (run_cv_study(args.study, args.root / args.study)
                               if args.study in CV_STUDIES else run_study(args.study))
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if args.replay:
        for name in CV_STUDIES:
            print("\n".join(replay(args.root / name, CV_RUNGS)))
        return
    print(report({k: v for k, v in results.items() if k in STUDIES}))
    for name in CV_STUDIES:
        if name in results and "exhaustive" in results[name]:
            print(f"\n{name}:\n{cv_report(results[name])}")


if __name__ == "__main__":
    main()
