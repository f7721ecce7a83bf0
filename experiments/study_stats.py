"""What the studies share: every run's per-image correctness, and its intervals and verdicts;
the sweeps they launch, and a pick trained again on the whole training split (``sweep``,
``seeds_held_out``).

A study keeps, for each final run, the correctness of the weights the run ends with on the
held-out split, image by image, as a string of ``0``/``1`` in its ``results.json``
(``val_correct``): ``transferlab-eval run=<dir> checkpoint=last`` writes the predictions
(``eval_predictions.npz``), read here. Its report then gives each group of seeds its 95 %
bootstrap interval and each pair of groups its paired verdict, both from
:mod:`transferlab.tools.stats` (the numbers ``transferlab-compare group_seeds=true`` prints).

Imported by the studies' ``run.py`` (``sys.path`` gets this folder).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from transferlab.run.predictions import EVAL_PREDICTIONS, load_predictions
from transferlab.tools.stats import (
    Difference,
    accuracy_interval,
    holm,
    p_text,
    paired_difference,
    points,
    verdict,
)


def last_correct(run_dir: Path, *extra: str, output: Path | None = None) -> str:
    """Evaluate ``run_dir``'s ``last.pt`` on its val split; its correctness as ``0``/``1``.
    With ``output``, the evaluation's files go there (``transferlab-eval output=``) and the
    run's own evaluation stays as it was."""
    cmd = ["transferlab-eval", f"run={run_dir}", "checkpoint=last", *extra,
           *([f"output={output}"] if output is not None else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return bits(load_predictions((output or run_dir) / EVAL_PREDICTIONS).correct)


def mean_sd(values: list[float], digits: int = 3) -> str:
    """``0.946 ± 0.010``: the mean and the sample standard deviation (the value alone for one)."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def bits(correct: np.ndarray) -> str:
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool))


def matrix(runs: list[dict], key: str = "val_correct") -> np.ndarray | None:
    """The ``(seeds, images)`` correctness of a group's runs; None when one lacks it."""
    rows = [r.get(key) for r in runs]
    if not rows or any(row is None for row in rows):
        return None
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


def interval_cell(runs: list[dict], key: str = "val_correct") -> str:
    """``0.946 [0.922, 0.965]``: the group's accuracy and its two-level bootstrap interval."""
    m = matrix(runs, key)
    if m is None:
        return ""
    got = accuracy_interval(m)
    return f"{got.estimate:.3f} [{got.low:.3f}, {got.high:.3f}]"


def against(groups: dict[str, list[dict]], reference: str,
            key: str = "val_correct") -> dict[str, tuple[Difference, float]]:
    """Every group minus ``reference``: the paired bootstrap over seeds (paired: the same
    seeds) and images, and its ``p`` Holm-adjusted over the pairs."""
    ref = matrix(groups.get(reference, []), key)
    pairs = [(name, matrix(runs, key)) for name, runs in groups.items() if name != reference]
    pairs = [(name, m) for name, m in pairs if m is not None and ref is not None
             and len(m) == len(ref)]
    diffs = [(name, paired_difference(m, ref, paired_seeds=True)) for name, m in pairs]
    adjusted = holm([d.p for _, d in diffs]) if diffs else []
    return {name: (d, float(p)) for (name, d), p in zip(diffs, adjusted, strict=True)}


def verdict_lines(groups: dict[str, list[dict]], reference: str,
                  key: str = "val_correct") -> list[str]:
    """:func:`against`, worded as ``transferlab-compare`` words it."""
    found = against(groups, reference, key)
    return [verdict(name, reference, d, adjusted=(p, len(found)) if len(found) > 1 else None)
            for name, (d, p) in found.items()]


def difference_cell(diff: Difference, holm_p: float) -> str:
    """``+1.3 [−0.6, +3.1], p 0.42``: points, the interval, Holm's p."""
    return (f"{points(diff.estimate)} [{points(diff.low)}, {points(diff.high)}], "
            f"{p_text(holm_p).replace(' = ', ' ')}")


__all__ = ["against", "applicable", "bits", "difference_cell", "held_out_record",
           "interval_cell", "kept", "last_correct", "matrix", "mean_sd", "seeds_held_out",
           "sweep", "timed", "verdict_lines"]


def kept(path: Path, compute) -> dict:
    """``compute()``, written to ``path`` (JSON) as it ends; or what an earlier run of the
    study kept there: a study stopped part-way goes on from the step it was in."""
    if path.is_file():
        print(f"{path.stem}: kept from an earlier run ({path})", flush=True)
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def timed(cmd: list[str], log: Path | None = None) -> float:
    """Run ``cmd`` (printed first; its output appended to ``log`` when given); its wall time.
    A failure ends the study with the command's last words (or the log's name)."""
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    if log is None:
        done = subprocess.run(cmd, capture_output=True, text=True)
    else:
        with open(log, "a") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): "
                 + (f"see {log}" if log is not None else f"\n{done.stderr[-3000:]}"))
    return wall


def sweep(args: list[str], out: Path, log: Path | None = None) -> float:
    """``transferlab-train -m <args>`` into ``out``; its wall time. A sweep stopped earlier in
    ``out`` goes on (``resume=auto``): then the wall time is that of the part run now."""
    again = ["resume=auto"] if any(out.glob("*/metrics.json")) else []
    return timed(["transferlab-train", "-m", *args, *again, f"hydra.sweep.dir={out}"], log)


def applicable(fixed: list[str], pick: list[str]) -> list[str]:
    """The overrides of ``fixed`` (fixed or swept) that the freeze policy of ``pick`` has: one
    run is strict, where a sweep applied each key to the jobs whose policy has it
    (docs/sweeps.md); ``trainer.epochs`` counts only for a policy that reads it."""
    from omegaconf import OmegaConf

    from transferlab.config.load import option_layers, uses_trainer_epochs

    policy = next(o.split("=", 1)[1] for o in pick if o.lstrip("+").startswith("freeze="))
    freeze = OmegaConf.merge(*option_layers("freeze", policy))
    keep = []
    for item in fixed:
        key = item.split("=")[0].lstrip("+")
        if key.startswith("freeze.") and key.split(".", 1)[1] not in freeze:
            continue
        if key == "trainer.epochs" and not uses_trainer_epochs(freeze):
            continue
        keep.append(item)
    return keep


def seeds_held_out(fixed: list[str], pick: list[str], out: Path, correctness: bool = False,
                   log: Path | None = None) -> dict:
    """``pick`` (a sweep's winning overrides) with the sweep's ``fixed`` ones, trained on the
    whole training split with seeds 0, 1, 2: the val accuracy each run ends with (the split
    no choice looked at), and with ``correctness`` each run's image-by-image correctness
    there (``val_correct``, for :func:`interval_cell`). ``log``: as :func:`timed`'s."""
    import yaml

    wall = sweep([*applicable(fixed, pick), *pick, "seed=0,1,2"], out, log)
    final, correct = {}, []
    for path in sorted(out.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        final[next(o for o in overrides if o.startswith("seed="))] = \
            record["history"][-1]["val_acc"]
        if correctness:
            correct.append(last_correct(path.parent))
    return held_out_record(wall, list(final.values()), correct if correctness else None)


def held_out_record(wall: float, values: list[float], correct: list[str] | None = None) -> dict:
    """What a held-out step keeps: its wall time, each run's val accuracy, their mean and sd,
    and with ``correct`` each run's image-by-image correctness (``val_correct``)."""
    result = {"wall_s": round(wall, 1), "final_val_acc": values,
              "mean": round(statistics.mean(values), 4),
              "sd": round(statistics.stdev(values), 4)}
    return result if correct is None else {**result, "val_correct": correct}
