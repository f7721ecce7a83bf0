"""Successive halving over a sweep's configurations, on exact pause and resume.

``transferlab-train -m hydra/sweeper=halving <the sweep's overrides>`` (the sweeper itself is
the Hydra plugin ``hydra_plugins.transferlab_halving``; this module is what it decides with).
Rung ``r`` trains every surviving configuration to ``min_epochs * eta**r`` epochs of its plan
(or ``rungs[r]``; capped at its plan's length and at ``max_epochs``): each job is launched
with ``trainer.pause_after_epoch`` set to that budget and ``resume=auto``, so a run that paused
at the last rung goes on from its checkpoint, in its own directory, exactly as if it had never
stopped. The best ``1/eta`` of the rung's configurations (at least one) go on; the others stay
paused (``resume=<run dir>`` finishes one by hand). A rung with one configuration is the last:
it runs to the end of its plan.

A configuration is the sweep's overrides but the keys in ``average_over`` (``dataset.fold``
and ``seed`` by default): its jobs, one per fold or seed, are ranked by the mean of their
values. A job's value is the best of ``metric`` (``mode``: max or min) over the epochs of its
record up to the rung's budget. Ties go to the configuration listed first (the sweep's order);
a configuration with a failed job ranks last.

The sweep root gets ``halving.json`` (rewritten after every rung: the budgets, each
configuration's values and who went on). A sweep stopped part-way is launched again with
``resume=auto``: its jobs that reached a rung's budget are not launched again, so finished
rungs are not redone (the decisions, made from the same records, are the same).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transferlab.config.sweep_keys import used_overrides
from transferlab.errors import UserError
from transferlab.infra.run_dirs import atomic_write_text
from transferlab.run.resume import PAUSE, reached, read_status
from transferlab.tools.sweep import job_name

log = logging.getLogger("transferlab")
MODES = {"max": max, "min": min}
RECORD = "halving.json"


@dataclass
class HalvingPlan:
    """The rung arithmetic: each rung's budget, and how many configurations go on (the
    defaults are the sweeper's config: ``hydra_plugins.transferlab_halving``)."""

    eta: int
    min_epochs: int
    rungs: list[int] | None  # the budgets, given (instead of min_epochs * eta**r)
    max_epochs: int | None  # None: each plan's own length

    def __post_init__(self) -> None:
        if not isinstance(self.eta, int) or self.eta < 2:
            raise UserError(f"hydra.sweeper.eta must be an integer >= 2, got {self.eta!r}")
        if not isinstance(self.min_epochs, int) or self.min_epochs < 1:
            raise UserError("hydra.sweeper.min_epochs must be an integer >= 1, got "
                            f"{self.min_epochs!r}")
        if self.rungs is not None:
            rungs = list(self.rungs)
            if not rungs or any(not isinstance(b, int) or b < 1 for b in rungs) \
                    or rungs != sorted(set(rungs)):
                raise UserError("hydra.sweeper.rungs must be increasing epoch counts >= 1, got "
                                f"{rungs}")
            self.rungs = rungs
        if self.max_epochs is not None and (not isinstance(self.max_epochs, int)
                                            or self.max_epochs < 1):
            raise UserError("hydra.sweeper.max_epochs must be an integer >= 1 (or null: each "
                            f"plan's own length), got {self.max_epochs!r}")

    def budget(self, rung: int) -> int:
        """The epochs rung ``rung`` trains each configuration to (before its plan's cap)."""
        if self.rungs is not None:
            budget = self.rungs[min(rung, len(self.rungs) - 1)]
        else:
            budget = self.min_epochs * self.eta ** rung
        return min(budget, self.max_epochs) if self.max_epochs is not None else budget

    def is_last(self, rung: int, alive: int) -> bool:
        """Whether rung ``rung`` (with ``alive`` configurations) is the sweep's last: one
        configuration left, the last of ``rungs``, or ``max_epochs`` reached."""
        if alive <= 1:
            return True
        if self.rungs is not None and rung >= len(self.rungs) - 1:
            return True
        return self.max_epochs is not None and self.budget(rung) >= self.max_epochs

    def pause_point(self, rung: int, alive: int) -> int | None:
        """``trainer.pause_after_epoch`` of the rung's jobs (None: to the end of the plan)."""
        if self.is_last(rung, alive):
            return self.max_epochs
        return self.budget(rung)

    def going_on(self, alive: int) -> int:
        """How many of ``alive`` configurations go on to the next rung."""
        return max(1, alive // self.eta)


def ranked(values: list[float | None], mode: str) -> list[int]:
    """The indices of ``values``, best first (``mode``: max or min); ties keep the order of
    the list; None (a failed job) last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(range(len(values)), key=lambda i: (values[i] is None,
                                                     sign * (values[i] or 0.0), i))


def tied_at_cut(values: list[float | None], order: list[int], keep: int) -> int:
    """How many of ``values`` share the value at the cut after the ``keep`` best (``order``:
    :func:`ranked`'s); 0 when the cut falls between two different values, or none is cut."""
    if keep >= len(values) or values[order[keep]] is None:
        return 0
    cut = values[order[keep - 1]]
    return sum(v == cut for v in values) if values[order[keep]] == cut else 0


def mean_of(values: list[float]) -> float:
    """A configuration's value: the mean of its jobs' (folds', seeds'), the same whatever the
    order of the jobs (``math.fsum`` is exact: a plain sum in another order can differ in its
    last bit, and that bit would decide a tie at a rung's cut instead of the command line's
    order), rounded to 12 decimals."""
    return round(math.fsum(values) / len(values), 12)


def run_value(status: dict, metric: str, mode: str, budget: int | None) -> float | None:
    """A job's value at a rung: the best ``metric`` over its record's epochs up to ``budget``
    (None: a failed run, or no epoch with the metric)."""
    if status.get("status") not in ("completed", "paused"):
        return None
    values = [r[metric] for r in status.get("history") or []
              if (budget is None or r.get("epoch", 0) <= budget)
              and isinstance(r.get(metric), int | float) and math.isfinite(r[metric])]
    return MODES[mode](values) if values else None


# --- the configurations of a sweep ----------------------------------------------------------


@dataclass
class Job:
    overrides: list[str]  # what Hydra composes it from
    subdir: str  # its run directory under the sweep's (the same in every rung)


@dataclass
class Configuration:
    index: int
    overrides: list[str]  # its values of the swept keys (those averaged over left out)
    jobs: list[Job] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)  # one per rung it ran in
    rung: int = 0  # the last rung it ran in

    @property
    def value(self) -> float | None:
        return self.values[-1] if self.values else None


def _sampled(override, rng: random.Random) -> str:
    """One value drawn from an ``interval(...)`` (``tag(log, ...)``: log-uniform)."""
    sweep = override.value()
    lo, hi = sweep.start, sweep.end
    if "log" in sweep.tags:
        if lo <= 0:
            raise UserError(f"{override.input_line}: a log interval must be above 0")
        value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    elif isinstance(lo, int) and isinstance(hi, int):
        return str(rng.randint(lo, hi))
    else:
        value = rng.uniform(lo, hi)
    return f"{value:.6g}"


def configurations(overrides: list, average_over: list[str], samples: int | None,
                   seed: int, optional: list[str] = ()) -> list[Configuration]:
    """The sweep's configurations from Hydra's parsed overrides: the grid of its discrete
    sweeps (``a=1,2``, ``choice``, ``range``), or ``samples`` configurations drawn (seeded)
    when it has intervals (each key: a random choice or a draw from its interval). The keys
    in ``average_over`` give each configuration one job per value. Points of the grid that
    differ only by ``optional`` keys their options do not use (a sweep across policies:
    :mod:`transferlab.config.sweep_keys`) are one configuration, listed once."""
    fixed, grid, drawn, averaged = [], [], [], []
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            fixed.append(f"{key}={o.get_value_element_as_str()}")
        elif not o.is_discrete_sweep():
            drawn.append(o)
        else:
            options = [f"{key}={v}" for v in o.sweep_string_iterator()]
            (averaged if key.lstrip("+~") in average_over else grid).append(options)
    rng = random.Random(seed)
    if drawn:
        if samples is None:
            raise UserError(f"{drawn[0].input_line}: an interval is sampled: give "
                            "hydra.sweeper.samples=N (the configurations to draw)")
        points = [[rng.choice(options) for options in grid]
                  + [f"{o.get_key_element()}={_sampled(o, rng)}" for o in drawn]
                  for _ in range(samples)]
    else:
        points = [list(p) for p in itertools.product(*grid)]
        if samples is not None and samples < len(points):
            points = [points[i] for i in sorted(rng.sample(range(len(points)), samples))]
    if optional:
        unique = {tuple(used_overrides(p, list(optional))): p for p in reversed(points)}
        points = [p for p in points if unique.get(tuple(used_overrides(p, list(optional))))
                  is p]
    out, num = [], 0
    for i, point in enumerate(points):
        shown = used_overrides(point, list(optional)) if optional else point
        config = Configuration(i, shown)
        for extra in itertools.product(*averaged):
            config.jobs.append(Job([*point, *extra, *fixed],
                                   job_name(num, [*shown, *extra, *fixed])))
            num += 1
        out.append(config)
    return out


# --- the sweep --------------------------------------------------------------------------------


@dataclass
class Halving:
    """One halving sweep: its plan, its configurations, and its record in ``sweep_dir``."""

    plan: HalvingPlan
    configs: list[Configuration]
    sweep_dir: Path
    metric: str = "val_acc"
    mode: str = "max"
    rungs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"hydra.sweeper.mode must be max or min, got {self.mode!r}")

    def rung_jobs(self, rung: int, alive: list[Configuration]) -> list[list[str]]:
        """The jobs rung ``rung`` launches (their overrides): each surviving configuration's
        jobs that have not reached the rung's pause point yet."""
        pause = self.plan.pause_point(rung, len(alive))
        extra = [f"{PAUSE}={'null' if pause is None else pause}", "resume=auto"]
        return [[*job.overrides, *extra, f"hydra.sweep.subdir={_quoted(job.subdir)}"]
                for config in alive for job in config.jobs
                if not reached(read_status(self.sweep_dir / job.subdir), pause)]

    def unfinished(self, alive: list[Configuration]) -> list[str]:
        """The jobs of the rung whose record did not end (a stopped sweep)."""
        return [job.subdir for config in alive for job in config.jobs
                if read_status(self.sweep_dir / job.subdir).get("status")
                not in ("completed", "paused", "failed")]

    def score(self, rung: int, alive: list[Configuration]) -> list[Configuration]:
        """Each configuration's value at the rung; the ones that go on (all, at the last)."""
        pause = self.plan.pause_point(rung, len(alive))
        for config in alive:
            values = [run_value(read_status(self.sweep_dir / j.subdir), self.metric, self.mode,
                                pause) for j in config.jobs]
            config.values.append(None if None in values or not values
                                 else mean_of(values))
            config.rung = rung
        last = self.plan.is_last(rung, len(alive))
        values = [c.value for c in alive]
        order = ranked(values, self.mode)
        keep = len(alive) if last else self.plan.going_on(len(alive))
        on = [alive[i] for i in sorted(order[:keep])]
        tied = tied_at_cut(values, order, keep)
        if tied:
            log.warning("halving: rung %d: %d configurations tie at %s %.4f where it cuts; the "
                        "first listed went on (configurations that train the same first stage "
                        "are alike until it ends: start the rungs after it with hydra.sweeper."
                        "min_epochs=N or hydra.sweeper.rungs=[...])", rung, tied, self.metric,
                        values[order[keep - 1]])
        self.rungs.append({"rung": rung, "budget": pause, "last": last, "tied_at_cut": tied,
                           "configurations": [
                               {"config": c.index, "value": c.value,
                                "went_on": c in on and not last}
                               for c in (alive[i] for i in order)]})
        self.write()
        return on

    def mark_runs(self) -> None:
        """Every run's HParams gain the rung it reached (``halving.rung``): the sweep's
        TensorBoard view then shows it beside the run's final metric."""
        from transferlab.run.record import add_hparams

        for config in self.configs:
            for job in config.jobs:
                add_hparams(self.sweep_dir / job.subdir, {"halving.rung": config.rung})

    def epochs_trained(self) -> int:
        """The epochs of every job's record (the sweep's compute, in epochs)."""
        return sum(len(read_status(self.sweep_dir / j.subdir).get("history") or [])
                   for c in self.configs for j in c.jobs)

    def winner(self) -> Configuration | None:
        last = self.rungs[-1]["configurations"] if self.rungs else []
        return self.configs[last[0]["config"]] if last and last[0]["value"] is not None \
            else None

    def write(self) -> None:
        data = {"metric": self.metric, "mode": self.mode, **asdict(self.plan),
                "configurations": [{"config": c.index, "overrides": c.overrides,
                                    "runs": [j.subdir for j in c.jobs], "rung": c.rung,
                                    "values": c.values} for c in self.configs],
                "rungs": self.rungs, "epochs_trained": self.epochs_trained()}
        winner = self.winner()
        if winner is not None and self.rungs[-1]["last"]:
            data["winner"] = {"config": winner.index, "overrides": winner.overrides,
                              "value": winner.value}
        atomic_write_text(self.sweep_dir / RECORD, json.dumps(data, indent=2))

    def table(self) -> str:
        """The sweep's end: one line per configuration, best first."""
        done = sorted(self.configs, key=lambda c: (-c.rung, *_key(c.value, self.mode), c.index))
        width = max([len(" ".join(c.overrides)) for c in self.configs] + [9])
        lines = [f"{'config':>6}  {'overrides':<{width}}  rung  {self.metric} by rung"]
        for c in done:
            values = "  ".join("failed" if v is None else f"{v:.4f}" for v in c.values)
            lines.append(f"{c.index:>6}  {' '.join(c.overrides):<{width}}  {c.rung:>4}  "
                         f"{values}")
        lines.append(f"{self.epochs_trained()} epochs trained in all; record: "
                     f"{self.sweep_dir / RECORD}")
        return "\n".join(lines)


# --- one rung of a finished (or stopped) sweep, for transferlab-compare --------------------


def runs_at_rung(runs: list, sweep_dir: Path, rung: int) -> list:
    """``transferlab-compare <sweep> rung=N``: the runs of the configurations that ran in
    rung ``N``, their records cut at its budget (best, final, epochs), status ``went on`` for
    those that went on to the next rung. Their per-image predictions (the run's ``best.pt``,
    later) are left out."""
    import dataclasses

    from transferlab.engine.best import epoch_rank

    try:
        record = json.loads((sweep_dir / RECORD).read_text())
    except (OSError, ValueError):
        raise UserError(f"rung={rung}: {sweep_dir} holds no readable {RECORD}: give the "
                        "directory of a halving sweep (hydra/sweeper=halving)") from None
    rungs = record.get("rungs") or []
    if not 0 <= rung < len(rungs):
        raise UserError(f"rung={rung}: the sweep ran rungs 0 to {len(rungs) - 1}")
    entry = rungs[rung]
    budget = entry["budget"] or math.inf
    went_on = {c["config"]: c["went_on"] for c in entry["configurations"]}
    dirs = {run: c["config"] for c in record["configurations"] for run in c["runs"]}
    out = []
    for run in runs:
        config = dirs.get(run.path.name)
        if config not in went_on:
            continue
        history = [e for e in run.history if e.get("epoch", 0) <= budget]
        best = max(history, key=epoch_rank, default={})  # (the first of equals: max keeps it)
        final = history[-1] if history else {}
        values = {**run.values, "best_val_acc": best.get("val_acc"),
                  "best_epoch": best.get("epoch"), "final_val_acc": final.get("val_acc"),
                  "final_val_loss": final.get("val_loss"), "epochs": len(history)}
        status = "went on" if went_on[config] else run.status
        out.append(dataclasses.replace(run, status=status, values=values, history=history,
                                       scored=None))
    return out


def _key(value: float | None, mode: str) -> tuple[bool, float]:
    return value is None, (-(value or 0.0) if mode == "max" else (value or 0.0))


def _quoted(text: str) -> str:
    """A value Hydra's override grammar reads back as the same string."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
