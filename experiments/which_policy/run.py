"""Which freeze policy for my data? Seven policies x two datasets x three training fractions.

    python experiments/which_policy/run.py                       # everything (hours on 2 CPU cores)
    python experiments/which_policy/run.py --datasets digits --fractions 0.1
    python experiments/which_policy/run.py --policies lora --seeds 0   # some of it
    python experiments/which_policy/run.py --report               # table + figure from results.json

Every run is ``transferlab-train`` with the default backbone (ImageNet EfficientNet-Lite0),
Adam lr 1e-3, batches of 16, no augmentation (so the frozen parts' features come from the
feature cache), a budget of 10 epochs, on ``dataset.train_fraction`` of the training split
(drawn by the seed), plus one policy's overrides (``POLICIES``). The seed draws the head, the
shuffling and the training subset.

The protocol:

1. **Selection by k-fold on the training split** (seed 0 only): for ``surgical``, every
   candidate block (``--blocks``) is trained ``--folds`` times, fold i of the (subset of the)
   training split as its validation set (``dataset.folds=K dataset.fold=i``); the block with
   the best mean fold accuracy is the one the final runs train. The dataset's own validation
   split is never seen here.
2. **Final runs**: every policy, seeds 0, 1, 2, trained on the whole (subset of the) training
   split and measured once on the held-out validation split: ``final_val_acc``, the weights
   the run ends with (no best-epoch picking on the held-out set).

Results go to ``results.json`` beside this script after every run (a rerun skips what is
there: delete an entry to run it again); ``--report`` writes ``README``'s table to stdout and
``val_acc.png``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study_stats import (  # noqa: E402
    against,
    difference_cell,
    interval_cell,
    last_correct,
    mean_sd,
    timed,
    verdict_lines,
)

RESULTS = HERE / "results.json"
COMMON = ["augment=none", "optimizer=adam", "optimizer.lr=1e-3", "trainer.batch_size=16",
          "trainer.progress=false", "trainer.keep_checkpoints=best_last"]
# small images: a 2-core CPU budget (hymenoptera's photos at 128 px instead of 224, digits'
# 8x8 scans upsampled to 32 px instead of 64)
DATASETS = {"hymenoptera": ["dataset=hymenoptera", "dataset.image_size=128"],
            "digits": ["dataset=digits", "dataset.image_size=32"]}
POLICIES = {
    # a new linear head on the frozen backbone, 10 epochs
    "linear_probe": ["freeze=linear_probe", "trainer.epochs=10"],
    # 10 epochs of the head, then blocks[-4:] + head at lr/10 for 4 (BatchNorm frozen)
    "two_stage": ["freeze=two_stage", "freeze.head_epochs=10", "freeze.finetune_epochs=4"],
    # 10 epochs of the head, then everything at lr/10 for 4 (every BatchNorm in eval mode)
    "lp_ft": ["freeze=lp_ft", "freeze.probe_epochs=10", "freeze.finetune_epochs=4"],
    # one block + the head, 6 epochs: the block is picked by k-fold (step 1)
    "surgical": ["freeze=surgical", "trainer.epochs=6"],
    # LoRA adapters (the preset's targets, rank and alpha) + the head, 6 epochs
    "lora": ["freeze=lora", "trainer.epochs=6"],
    # lp_ft with the L2-SP penalty toward the pretrained weights (alpha 0.1, beta 0.01: the
    # paper's values)
    "l2sp": ["freeze=lp_ft", "freeze.probe_epochs=10", "freeze.finetune_epochs=4",
             "trainer.regularize.name=l2sp", "trainer.regularize.alpha=0.1",
             "trainer.regularize.beta=0.01"],
}
BLOCKS = [0, 6, 12, 17]  # of the default backbone's 18 blocks


def sweep(args: list[str], out: Path, correctness: bool = False) -> list[dict]:
    """One ``transferlab-train -m`` (its jobs one after the other in one process: the imports
    and the model build are paid once); every job's summary and its ``hparams``, and with
    ``correctness`` the held-out correctness of its last weights, image by image."""
    wall = timed(["transferlab-train", "-m", *COMMON, *args, f"hydra.sweep.dir={out}"])
    jobs = []
    for path in sorted(out.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        last = m["history"][-1]
        jobs.append({"final_val_acc": m["final"]["val_acc"],
                     "final_val_loss": m["final"]["val_loss"],
                     "final_train_acc": last.get("train_acc"), "epochs": len(m["history"]),
                     "trainable_params": m["params"]["trainable"],
                     "train_seconds": round(m["wall_seconds"], 1),
                     "train_images": m["data"]["train"], "val_images": m["data"]["val"],
                     "hparams": m["hparams"],
                     **({"val_correct": last_correct(path.parent)} if correctness else {})})
    print(f"  {len(jobs)} jobs, {wall:.0f} s", flush=True)
    return jobs


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(results: dict) -> None:
    """Merge ``results`` into the file (several of these scripts may run at once, e.g. one per
    dataset: each adds its own keys), under a lock."""
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**load(), **results}
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        tmp.replace(RESULTS)


def key(*parts) -> str:
    return "/".join(str(p) for p in parts)


def selected_block(results: dict, dataset: str, fraction: float, folds: int,
                   blocks: list[int]) -> tuple[int, dict[int, float]]:
    """The candidate block with the best mean k-fold accuracy (ties: the later block, fewer
    parameters to backpropagate to)."""
    means = {}
    for b in blocks:
        accs = [results[k]["final_val_acc"] for f in range(folds)
                if (k := key(dataset, fraction, "select", f"block{b}", f"fold{f}")) in results]
        if len(accs) == folds:
            means[b] = statistics.mean(accs)
    if not means:
        raise SystemExit(f"no complete k-fold selection for {dataset} {fraction}")
    best = max(means, key=lambda b: (means[b], b))
    return best, means


def run_all(args) -> None:
    results = load()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dataset in args.datasets:
            for fraction in args.fractions:
                base = [*DATASETS[dataset], f"dataset.train_fraction={fraction}"]
                if "surgical" in args.policies:
                    wanted = [key(dataset, fraction, "select", f"block{b}", f"fold{f}")
                              for b in args.blocks for f in range(args.folds)]
                    if any(k not in results for k in wanted):
                        blocks = ",".join(map(str, args.blocks))
                        folds = ",".join(map(str, range(args.folds)))
                        for job in sweep([*base, *POLICIES["surgical"], f"freeze.block={blocks}",
                                          f"dataset.folds={args.folds}", f"dataset.fold={folds}",
                                          "seed=0"], root / key(dataset, fraction, "select")):
                            h = job["hparams"]
                            results[key(dataset, fraction, "select", f"block{h['freeze.block']}",
                                        f"fold{h['dataset.fold']}")] = job
                        save(results)
                for policy in args.policies:
                    extra = []
                    if policy == "surgical":
                        block, _ = selected_block(results, dataset, fraction, args.folds,
                                                  args.blocks)
                        extra = [f"freeze.block={block}"]
                    wanted = [key(dataset, fraction, policy, f"seed{s}") for s in args.seeds]
                    results = {**load(), **results}  # what other processes of this script added
                    # a final run recorded before its per-image correctness was kept runs again
                    todo = [s for s, k in zip(args.seeds, wanted, strict=True)
                            if "val_correct" not in results.get(k, {})]
                    if not todo:
                        continue
                    # one sweep of the seeds (the imports paid once), or one per seed (a result
                    # saved as soon as it is there)
                    groups = [[s] for s in todo] if args.seed_by_seed else [todo]
                    for group in groups:
                        if all("val_correct" in load().get(key(dataset, fraction, policy,
                                                                f"seed{s}"), {}) for s in group):
                            continue  # another process of this script did it meanwhile
                        seeds = ",".join(map(str, group))
                        # (a comma in hydra.sweep.dir would read as a sweep of it)
                        folder = root / key(dataset, fraction, policy, seeds.replace(",", "-"))
                        for job in sweep([*base, *POLICIES[policy], *extra, f"seed={seeds}"],
                                         folder, correctness=True):
                            results[key(dataset, fraction, policy,
                                        f"seed{job['hparams']['seed']}")] = {
                                **job, **({"block": block} if extra else {})}
                        save(results)
                    print(dataset, fraction, policy, [results[k]["final_val_acc"]
                                                      for k in wanted], flush=True)


def report(args) -> None:
    results = load()
    fractions = args.fractions
    for dataset in args.datasets:
        print(f"\n### {dataset}\n")
        print("| policy | " + " | ".join(f"{f:g} of train" for f in fractions) + " |")
        print("|---|" + "---:|" * len(fractions))
        for policy in POLICIES:
            cells = []
            for fraction in fractions:
                accs = [results[k]["final_val_acc"] for s in args.seeds
                        if (k := key(dataset, fraction, policy, f"seed{s}")) in results]
                cell = mean_sd(accs) if accs else ""
                if accs and policy == "surgical":
                    cell += f" (block {results[key(dataset, fraction, policy, 'seed0')]['block']})"
                cells.append(cell)
            print(f"| {policy} | " + " | ".join(cells) + " |")
        statistics_table(results, dataset, args)
        print(f"\nk-fold ({args.folds} folds, seed 0) mean accuracy of surgical per block:\n")
        print("| block | " + " | ".join(f"{f:g}" for f in fractions) + " |")
        print("|---|" + "---:|" * len(fractions))
        means = {}
        for fraction in fractions:
            try:
                means[fraction] = selected_block(results, dataset, fraction, args.folds,
                                                 args.blocks)[1]
            except SystemExit:
                means[fraction] = {}
        for b in args.blocks:
            print(f"| {b} | " + " | ".join(f"{means[f][b]:.3f}" if b in means[f] else ""
                                          for f in fractions) + " |")
    figure(results, args)


def statistics_table(results: dict, dataset: str, args) -> None:
    """linear_probe's accuracy with its 95 % interval (seeds and images resampled), and every
    other policy's paired difference from it (Holm over the policies at one data size)."""
    by_fraction = {f: {p: [results[k] for s in args.seeds
                           if (k := key(dataset, f, p, f"seed{s}")) in results]
                       for p in POLICIES} for f in args.fractions}
    if not any(interval_cell(g["linear_probe"]) for g in by_fraction.values()):
        return
    print("\nThe same runs' last weights: linear_probe's accuracy with its 95 % interval, and "
          "every other policy minus linear_probe in points, its paired 95 % interval and "
          "Holm's p:\n")
    print("| policy | " + " | ".join(f"{f:g} of train" for f in args.fractions) + " |")
    print("|---|" + "---:|" * len(args.fractions))
    diffs = {f: against(groups, "linear_probe") for f, groups in by_fraction.items()}
    for policy in POLICIES:
        cells = [interval_cell(by_fraction[f][policy]) if policy == "linear_probe" else
                 difference_cell(*diffs[f][policy]) if policy in diffs[f] else ""
                 for f in args.fractions]
        print(f"| {policy} | " + " | ".join(cells) + " |")
    print("\nThe pairs the reading cites (one paired test each): the best mean against the "
          "runner-up, and l2sp against lp_ft (what the L2-SP penalty adds):\n")
    for f, groups in by_fraction.items():
        ranked = sorted((p for p in groups if groups[p]),
                        key=lambda p: -statistics.mean(r["final_val_acc"] for r in groups[p]))
        pairs = [tuple(ranked[:2]), ("l2sp", "lp_ft")]
        for a, b in pairs[:1] if set(pairs[0]) == set(pairs[1]) else pairs:
            for line in verdict_lines({a: groups[a], b: groups[b]}, b):
                print(f"- {f:g} of train: {line}")


def figure(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.datasets), figsize=(6 * len(args.datasets), 4.5),
                             squeeze=False)
    for ax, dataset in zip(axes[0], args.datasets, strict=True):
        for i, policy in enumerate(POLICIES):
            xs, ys, es = [], [], []
            for j, fraction in enumerate(args.fractions):
                accs = [results[k]["final_val_acc"] for s in args.seeds
                        if (k := key(dataset, fraction, policy, f"seed{s}")) in results]
                if accs:
                    xs.append(j + (i - len(POLICIES) / 2) * 0.08)
                    ys.append(statistics.mean(accs))
                    es.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=policy)
        ax.set_xticks(range(len(args.fractions)),
                      [f"{f:g}" for f in args.fractions])
        ax.set_xlabel("fraction of the training split")
        ax.set_ylabel("held-out val accuracy (mean ± sd, 3 seeds)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "val_acc.png", dpi=110)
    print(f"\nwrote {HERE / 'val_acc.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blocks", type=int, nargs="+", default=BLOCKS)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed-by-seed", action="store_true",
                        help="one transferlab-train per seed, each result saved at once")
    parser.add_argument("--report", action="store_true", help="only the table and the figure")
    args = parser.parse_args()
    if not args.report:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
