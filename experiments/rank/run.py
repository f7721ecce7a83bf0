"""Do the transferability scores rank what fine-tuning reaches? Kendall's tau per score.

    python experiments/rank/run.py digits                # one data set (see DATASETS)
    python experiments/rank/run.py all                   # the four, one after the other
    python experiments/rank/run.py --report              # README's tables from results.json

For each data set, the candidates are the three offline ImageNet backbones (EfficientNet-Lite0,
-Lite1, -Lite2), each whole and cut after the last block of its stages 3, 4 and 5
(``backbone.cut``), and two negatives: Lite0 from random weights, and transferlab's small
``conv_encoder`` whose conv layers come from an autoencoder trained on the same training
images (``experiment=ae_pretrain``; 32 px, as that encoder takes). That is 14 candidates.

1. **Ranking.** ``transferlab-rank`` scores the three pretrained backbones and every block
   boundary (all scores: LogME, LEEP, NCE, H-score and its shrinkage form, TransRate, the
   5-fold logistic-regression probe), on an empty feature cache: its wall time is the cost of
   ranking. A cut candidate's features are the block row's (``tests/test_backbone_cut.py``
   checks that they are the same tensors). The negatives are scored in-process
   (``transferlab.tools.rank.rank_run_backbone``), timed too.
2. **Fine-tuning.** Every candidate trains with one fixed recipe (``RECIPE``, which_policy's
   two_stage: Adam 1e-3, batch 16, 10 epochs of the head on the frozen candidate, then 4 epochs
   of the head and the candidate's last two blocks at lr/10; no augmentation, so the frozen
   parts read the feature cache), seeds 0, 1, 2. The
   number is the validation accuracy each run ends with (nothing is selected on val); the
   candidate's is the mean over seeds.
3. **Kendall's tau** (scipy's tau-b) between each score and the candidates' fine-tuned means,
   over the candidates the score applies to (LEEP and NCE read the ImageNet classifier: whole
   backbones only), with its p-value and whether the score's top candidate is the fine-tuned
   best (and how far below it, when not).

The 10 % data sets draw one training subset (``dataset.subset_seed=0``) for the ranking and
every seed, as a user with few labels has one. Digits' 8x8 scans are upsampled to 32 px for
every candidate (a 2-core CPU budget, as in ``which_policy``); hymenoptera runs at each
backbone's own size (224, 240, 260 px) and the conv encoder's 32 px.

The sweeps and finished steps are kept under ``--root`` (default ``outputs/rank-study``): a
stopped run goes on from the step it was in. Results go to ``results.json`` beside this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study_stats import kept, seeds_held_out, timed  # noqa: E402

RESULTS = HERE / "results.json"
DATASETS = {
    "digits": ["dataset=digits", "dataset.image_size=32"],
    "digits_10pct": ["dataset=digits", "dataset.image_size=32", "dataset.train_fraction=0.1",
                     "dataset.subset_seed=0"],
    "hymenoptera": ["dataset=hymenoptera"],
    "hymenoptera_10pct": ["dataset=hymenoptera", "dataset.train_fraction=0.1",
                          "dataset.subset_seed=0"],
}
ZOO = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
SCORES = ["logme", "leep", "nce", "h_score", "h_score_shrinkage", "transrate", "probe"]
STAGES = (3, 4, 5)  # cut after the last block of each of these stages (and whole)
RECIPE = ["augment=none", "optimizer=adam", "optimizer.lr=1e-3", "trainer.batch_size=16",
          "freeze=two_stage", "freeze.head_epochs=10", "freeze.finetune_epochs=4",
          "freeze.fine_tune_at=-2"]
COMMON = ["trainer.progress=false", "trainer.deterministic=true"]
AE_EPOCHS = 20
AE_INIT = ["backbone.init.include=[encoder.conv*]", "backbone.init.strip_prefix=encoder."]
SMALL = ["dataset.image_size=32", "dataset.crop_pct=1.0"]


def candidates(rank_rows: list[dict]) -> dict[str, list[str]]:
    """The pretrained candidates by label: each backbone whole and cut after ``STAGES``."""
    out = {}
    for backbone in ZOO:
        rows = [r for r in rank_rows if r["backbone"] == backbone and r["block"]]
        for stage in STAGES:
            last = max((r for r in rows if r["block"].startswith(f"blocks.{stage}.")),
                       key=lambda r: r["block_index"])
            out[f"{backbone} @ {last['block']}"] = [f"backbone={backbone}",
                                                   f"backbone.cut={last['block']}"]
        out[backbone] = [f"backbone={backbone}"]
    return out


def rank_scores(rank_rows: list[dict], label: str) -> dict[str, float | None]:
    backbone, _, block = label.partition(" @ ")
    row = next(r for r in rank_rows if r["backbone"] == backbone
               and (r["block"] or "") == block and not r.get("error"))
    return row["scores"]


def score_negative(data: list[str], overrides: list[str], label: str) -> dict:
    """The scores of a candidate ``transferlab-rank`` cannot name (random weights, an
    autoencoder's encoder), in-process, and their time."""
    from transferlab.config import compose_config, load_config
    from transferlab.infra.runtime import pick_device
    from transferlab.tools.rank import rank_run_backbone

    args = [*data, *overrides]
    started = time.perf_counter()
    run = load_config(compose_config(args), args)
    rows = rank_run_backbone(run, label, SCORES, False, pick_device("cpu"))
    if rows[0].error:
        sys.exit(f"{label}: {rows[0].error}")
    return {"scores": rows[0].scores, "seconds": round(time.perf_counter() - started, 1)}


def fine_tune(data: list[str], overrides: list[str], out: Path, log: Path) -> dict:
    """The recipe on one candidate, seeds 0, 1, 2: the final val accuracy of each."""
    return seeds_held_out([*data, *COMMON, *overrides], RECIPE, out, log=log)


def taus(found: dict[str, dict]) -> dict[str, dict]:
    """Per score: Kendall's tau-b against the fine-tuned means, its p-value, the candidates it
    applies to, and the fine-tuned mean of its top candidate against the best."""
    from scipy.stats import kendalltau

    out = {}
    for score in SCORES:
        have = {k: v for k, v in found.items() if v["scores"].get(score) is not None}
        if len(have) < 3:
            continue
        xs = [v["scores"][score] for v in have.values()]
        ys = [v["fine_tuned"]["mean"] for v in have.values()]
        if len(set(xs)) == 1:  # no order to compare (NCE on a few images: every one 0)
            out[score] = {"tied": xs[0], "n": len(have)}
            continue
        tau, p = kendalltau(xs, ys)
        top = max(have, key=lambda k: have[k]["scores"][score])
        best = max(have, key=lambda k: have[k]["fine_tuned"]["mean"])
        out[score] = {"tau": round(float(tau), 3), "p": round(float(p), 4), "n": len(have),
                      "top": top, "top_mean": have[top]["fine_tuned"]["mean"],
                      "best": best, "best_mean": have[best]["fine_tuned"]["mean"]}
    return out


def run_dataset(name: str, root: Path) -> dict:
    data = DATASETS[name]
    root = root / name
    root.mkdir(parents=True, exist_ok=True)
    log = root / "study.log"
    cache = [f"trainer.feature_cache.dir={root / 'feature_cache'}"]  # this study's own store

    def ranking() -> dict:
        wall = timed(["transferlab-rank", *data, *cache, f"backbones={','.join(ZOO)}",
                      f"scores={','.join(SCORES)}", "against=none",
                      f"output={root / 'rank'}"], log)
        rows = json.loads((root / "rank" / "rank.json").read_text())["rows"]
        return {"wall_s": round(wall, 1), "rows": rows}

    ranked = kept(root / "rank_step.json", ranking)
    pretrained = candidates(ranked["rows"])
    ae_run = root / "ae"
    kept(root / "ae_step.json", lambda: {"wall_s": round(timed(
        ["transferlab-train", "experiment=ae_pretrain", *data, *SMALL, *COMMON,
         f"trainer.epochs={AE_EPOCHS}", f"hydra.run.dir={ae_run}"], log), 1)})
    negatives = {
        "efficientnet_lite0, random weights": ["backbone=efficientnet_lite0",
                                               "backbone.pretrained=false"],
        "conv_encoder from an autoencoder": [
            "backbone=conv_encoder", f"backbone.init.path={ae_run / 'checkpoints' / 'best.pt'}",
            *AE_INIT, *SMALL],
    }
    found: dict[str, dict] = {}
    for label, overrides in {**pretrained, **negatives}.items():
        slug = label.replace(" @ ", "@").replace(", ", "_").replace(" ", "_")
        if label in negatives:
            scored = kept(root / "scores" / f"{slug}.json",
                          lambda o=overrides, lb=label: score_negative([*data, *cache], o, lb))
        else:
            scored = {"scores": rank_scores(ranked["rows"], label), "seconds": None}
        tuned = kept(root / "fine_tuned" / f"{slug}.json",
                     lambda o=overrides, s=slug: fine_tune([*data, *cache], o,
                                                            root / "sweeps" / s, log))
        found[label] = {"overrides": overrides, "scores": scored["scores"],
                        "score_s": scored["seconds"], "fine_tuned": tuned}
        print(label, json.dumps({"logme": scored["scores"].get("logme"), **tuned}), flush=True)
    return {"data": data, "recipe": RECIPE, "rank_wall_s": ranked["wall_s"],
            "negatives_score_s": round(sum(found[k]["score_s"] for k in negatives), 1),
            "fine_tune_wall_s": round(sum(v["fine_tuned"]["wall_s"] for v in found.values()), 1),
            "candidates": found, "taus": taus(found)}


def report(results: dict) -> str:
    lines = ["| data | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
    for name, r in results.items():
        cells = []
        for score in SCORES:
            t = r["taus"].get(score)
            cells.append("n/a" if t is None else f"all {t['tied']:g}: no order (n {t['n']})"
                         if "tied" in t else f"{t['tau']:+.2f} (p {t['p']:.2f}, n {t['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| data | score | its top candidate | that one fine-tuned | the best fine-tuned "
              "| points below |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for score, t in r["taus"].items():
            if "tied" in t:
                continue
            lines.append(f"| {name} | {score} | {t['top']} | {t['top_mean']:.4f} | "
                         f"{t['best']} {t['best_mean']:.4f} | "
                         f"{100 * (t['best_mean'] - t['top_mean']):.1f} |")
    lines += ["", "| data | ranking (all scores) | fine-tuning all 14 × 3 seeds | ratio |",
              "|---|---|---|---|"]
    for name, r in results.items():
        rank_s = r["rank_wall_s"] + r["negatives_score_s"]
        lines.append(f"| {name} | {rank_s:.0f} s | {r['fine_tune_wall_s']:.0f} s | "
                     f"{r['fine_tune_wall_s'] / rank_s:.1f}x |")
    lines += ["", "| data | candidate | logme | probe | fine-tuned (mean ± sd) |",
              "|---|---|---|---|---|"]
    for name, r in results.items():
        for label, c in sorted(r["candidates"].items(),
                               key=lambda kv: -kv[1]["fine_tuned"]["mean"]):
            s, f = c["scores"], c["fine_tuned"]
            lines.append(f"| {name} | {label} | {s['logme']:.4f} | {s['probe']:.4f} | "
                         f"{f['mean']:.4f} ± {f['sd']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", choices=[*DATASETS, "all"])
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("outputs/rank-study"),
                        help="where the study keeps its runs and finished steps (a rerun goes "
                             "on from there)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in (DATASETS if args.study == "all" else [args.study] if args.study else []):
        results[name] = run_dataset(name, args.root)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
