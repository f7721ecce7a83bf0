"""``transferlab-compare``: a table (and a figure) of runs, read from their ``metrics.json``.

    transferlab-compare outputs/sweeps/2026-11-23/10-00-00_digits-efficientnet_lite0-linear_probe
    transferlab-compare outputs/ sort=final_val_loss format=markdown
    transferlab-compare <sweep> group_seeds=true       # mean +- std over seeds
    transferlab-compare <sweep> group_folds=true       # mean +- std over k-fold folds
    transferlab-compare <sweep> plot=false             # no figure (plot=curves.png: there)
    transferlab-compare <sweep> tensorboard=true       # the command to open it in TensorBoard
    transferlab-compare --help                         # every key

Arguments are ``key=value``, as for ``transferlab-train`` (:mod:`transferlab.cli.args`); the other
arguments are the directories to read (default: ``outputs``). It reads files only, so it works
on partial sweeps and on runs still going.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from transferlab.config.validate import is_session_override
from transferlab.infra.liveness import run_status
from transferlab.infra.run_dirs import capped_name, safe_name
from transferlab.tools.compare_stats import (
    Scored,
    group_scored,
    interval_text,
    interval_values,
    natural,
    read_scored,
    statistics_text,
)

# column -> (header, True when larger is better)
METRICS = {
    "best_val_acc": ("best val acc", True),
    "best_epoch": ("best epoch", False),
    "final_val_acc": ("final val acc", True),
    "final_val_loss": ("final val loss", False),
    "epochs": ("epochs", True),
    "trainable": ("trainable params", True),
    "wall_seconds": ("wall s", False),
}
SEED_KEYS = ("seed",)
FOLD_KEYS = ("dataset.fold",)
FORMATS = ("table", "markdown", "csv")


@dataclass
class RunRecord:
    """One run as ``metrics.json`` and Hydra's ``overrides.yaml`` describe it."""

    path: Path
    status: str
    overrides: list[str] = field(default_factory=list)
    values: dict[str, float | None] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    error: str | None = None
    runs: int = 1  # > 1 for a group of seeds (or folds)
    spread: dict[str, float] = field(default_factory=dict)  # std over the group's runs
    hparams: dict = field(default_factory=dict)  # the run's HParams record
    members: list[RunRecord] = field(default_factory=list)  # a group's runs
    scored: Scored | None = None  # per-image val correctness (tools.compare_stats)

    def value(self, key: str) -> float | None:
        return self.values.get(key)


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return []
    return [str(i) for i in items if not str(i).lstrip("+~").startswith(("hydra.", "hydra/"))
            and not is_session_override(str(i))]


def read_run(run_dir: Path, scored: bool = True) -> RunRecord:
    """A run directory's record; ``pending`` before its first ``metrics.json``. ``scored``:
    with its per-image predictions (for the paired tests), read from their file."""
    path = run_dir / "metrics.json"
    overrides = _overrides(run_dir)
    if not path.is_file():
        return RunRecord(run_dir, "pending", overrides)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return RunRecord(run_dir, "unreadable", overrides, error=f"metrics.json: {exc}")
    problem = _foreign(data)
    if problem:
        return RunRecord(run_dir, "unreadable", overrides, error=f"metrics.json: {problem}")
    history = data.get("history") or []
    best, final = data.get("best") or {}, data.get("final") or {}
    values = {
        "best_val_acc": best.get("val_acc"),
        "best_epoch": best.get("epoch"),
        "final_val_acc": final.get("val_acc"),
        "final_val_loss": final.get("val_loss"),
        "epochs": len(history),
        "trainable": (data.get("params") or {}).get("trainable"),
        "wall_seconds": data.get("wall_seconds"),
    }
    return RunRecord(run_dir, run_status(data), overrides, values, history, data.get("error"),
                     hparams=dict(data.get("hparams") or {}),
                     scored=read_scored(run_dir, best.get("epoch")) if scored else None)


def _foreign(data: object) -> str | None:
    """Why a JSON document is not a transferlab ``metrics.json`` (None when it is one)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not a transferlab record"
    if not isinstance(data.get("status"), str) or not isinstance(data.get("history", []), list):
        return "not a transferlab record (no status / history)"
    for key in ("best", "final", "params"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"not a transferlab record ({key} is a {type(data[key]).__name__})"
    if any(not isinstance(h, dict) for h in data.get("history") or []):
        return "not a transferlab record (history entries are not records)"
    lacking = [k for h in data.get("history") or [] for k in ("epoch", "stage", "val_loss")
               if k not in h]
    if lacking:
        return f"not a transferlab record (a history entry has no {lacking[0]!r})"
    return None


def find_runs(paths: Iterable[Path], scored: bool = True) -> list[RunRecord]:
    """Every run under ``paths`` (a run directory, a sweep, or a whole ``outputs/``);
    ``scored``: as :func:`read_run`."""
    dirs: dict[Path, None] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        found = [p.parent for p in root.rglob("metrics.json")]
        found += [p.parent.parent for p in root.rglob(".hydra/overrides.yaml")]
        for d in sorted(set(found)):
            dirs.setdefault(d.resolve(), None)
    return [read_run(d, scored) for d in dirs]


def sort_runs(runs: list[RunRecord], key: str, reverse: bool = False) -> list[RunRecord]:
    """Best first by ``key`` (larger accuracy, smaller loss...); runs without it last."""
    if key not in METRICS:
        raise ValueError(f"unknown sort key {key!r}; choose one of {', '.join(METRICS)}")
    larger_is_better = METRICS[key][1] != reverse
    have = [r for r in runs if r.value(key) is not None]
    missing = [r for r in runs if r.value(key) is None]
    have.sort(key=lambda r: r.value(key), reverse=larger_is_better)
    return have + missing


def _key_of(item: str) -> str:
    return item.partition("=")[0].lstrip("+~")


def group_seeds(runs: list[RunRecord]) -> list[RunRecord]:
    """Runs whose overrides differ only by ``seed`` merged into one row: mean and std."""
    return group_runs(runs, SEED_KEYS)


def group_folds(runs: list[RunRecord]) -> list[RunRecord]:
    """Runs whose overrides differ only by ``dataset.fold`` (the folds of one k-fold
    cross-validation) merged into one row: mean and std over the folds."""
    return group_runs(runs, FOLD_KEYS)


def group_runs(runs: list[RunRecord], keys: tuple[str, ...]) -> list[RunRecord]:
    """Runs whose overrides differ only by the override ``keys`` merged into one row: the
    mean of every metric and its std over the group's runs."""
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for run in runs:
        key = tuple(sorted(o for o in run.overrides if _key_of(o) not in keys))
        groups.setdefault(key, []).append(run)
    merged = []
    for key, members in groups.items():
        statuses = sorted({m.status for m in members})
        status = statuses[0] if len(statuses) == 1 else ", ".join(
            f"{sum(m.status == s for m in members)} {s}" for s in statuses)
        values, spread = {}, {}
        for name in METRICS:
            xs = [m.value(name) for m in members if m.value(name) is not None]
            values[name] = statistics.fmean(xs) if xs else None
            spread[name] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        label = list(key)
        for name in keys:
            got = sorted((o.partition("=")[2] for m in members for o in m.overrides
                          if _key_of(o) == name), key=natural)
            if got:
                label.append(f"{name}={','.join(got)}")
        errors = [m.error for m in members if m.error]
        merged.append(RunRecord(members[0].path, status, label, values,
                                members[0].history, errors[0] if errors else None,
                                runs=len(members), spread=spread, members=members,
                                scored=_group_scored(members, keys)))
    return merged


def _group_scored(members: list[RunRecord], keys: tuple[str, ...]) -> Scored | None:
    """The group's correctness: a row per seed (the grouped keys but the fold), its folds'
    val images side by side."""
    def values(member: RunRecord, names) -> str:
        return ",".join(o.partition("=")[2] for o in member.overrides
                        if _key_of(o) in names)

    rows = tuple(k for k in keys if k not in FOLD_KEYS)
    return group_scored([(m.scored, values(m, rows), values(m, FOLD_KEYS)) for m in members])


def varying_overrides(runs: list[RunRecord]) -> list[list[str]]:
    """Each run's overrides, keeping only the keys whose values differ between the runs."""
    if len(runs) < 2:
        return [r.overrides for r in runs]
    seen: dict[str, set[str]] = {}
    for run in runs:
        for item in run.overrides:
            seen.setdefault(_key_of(item), set()).add(item)
    fixed = {k for k, v in seen.items()
             if len(v) == 1 and all(any(_key_of(o) == k for o in r.overrides) for r in runs)}
    return [[o for o in r.overrides if _key_of(o) not in fixed] for r in runs]


def _fmt(run: RunRecord, name: str, plus_minus: str = " ± ") -> str:
    value = run.value(name)
    if value is None:
        return "-"
    if name in ("best_val_acc", "final_val_acc", "final_val_loss"):
        text = f"{value:.4f}"
        if run.runs > 1:
            text += f"{plus_minus}{run.spread.get(name, 0.0):.4f}"
        return text
    if name == "wall_seconds":
        return f"{value:.1f}"
    if name in ("best_epoch",) and run.runs > 1:
        return f"{value:.1f}"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.1f}"
    return f"{int(value):,}" if name == "trainable" else f"{int(value)}"


def _run_label(run: RunRecord, root: Path | None) -> str:
    """The run's directory relative to ``root``; a sweep job's number alone (its name repeats
    the overrides, which have their own column)."""
    if root is None:
        return str(run.path)
    try:
        name = str(run.path.relative_to(root.resolve())) or "."
    except ValueError:
        return str(run.path)
    number, sep, _ = name.partition("_")
    return number if sep and number.isdigit() and "/" not in name else name


CI_HEADER = "95% CI"  # beside best val acc: the interval of best.pt's val accuracy


def _rows(runs: list[RunRecord], root: Path | None) -> tuple[list[str], list[list[str]]]:
    header = ["run", "overrides", "status"] + [METRICS[m][0] for m in METRICS]
    header.insert(header.index(METRICS["best_val_acc"][0]) + 1, CI_HEADER)
    if any(r.runs > 1 for r in runs):
        header.insert(3, "runs")
    rows = []
    for run, overrides in zip(runs, varying_overrides(runs), strict=True):
        said = run.error and run.status in ("failed", "unreadable")
        status = run.status + (f": {run.error}" if said else "")
        row = [_run_label(run, root), " ".join(overrides) or "-", status]
        if "runs" in header:
            row.append(str(run.runs))
        row += [_fmt(run, m) for m in METRICS]
        row.insert(header.index(CI_HEADER), interval_text(run.scored))
        rows.append(row)
    return header, rows


def format_table(runs: list[RunRecord], fmt: str = "table", root: Path | None = None,
                 width: int | None = None) -> str:
    """The runs as an aligned text table (fitted to ``width`` columns, by default the
    terminal's when it goes to one: :func:`fit_table`), a Markdown table or CSV."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        names = list(METRICS)
        writer.writerow(["run", "overrides", "status", "error", "runs", *names,
                         *(f"{n}_std" for n in names), "val_acc_ci_low", "val_acc_ci_high"])
        for run, overrides in zip(runs, varying_overrides(runs), strict=True):
            writer.writerow([str(run.path), " ".join(overrides), run.status, run.error or "",
                             run.runs, *(_csv(run.value(n)) for n in names),
                             *(_csv(run.spread.get(n)) if run.runs > 1 else "" for n in names),
                             *(_csv(v) for v in interval_values(run.scored))])
        return out.getvalue().rstrip("\n")
    header, rows = _rows(runs, root)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; choose table, markdown or csv")
    return fit_table(header, rows, width or _terminal_width())


def _terminal_width() -> int:
    """The terminal's columns when the table goes to one; a file or a pipe gets the whole
    table, one row a line, as ``git`` and ``ls`` do."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((120, 24)).columns
    return 10**6


# Text columns a table narrows, in this order, to fit its width (status, overrides, run), and
# how narrow each may get.
_NARROWED = ((2, 16), (1, 16), (0, 32))


def fit_table(header: list[str], rows: list[list[str]], width: int) -> str:
    """An aligned table at most ``width`` characters wide where it can be: the headers of
    several words take two lines, then the status, overrides and run columns are cut (``…``)
    as far as their minimum (a run's path keeps its end: its time and name); a cut status or
    overrides cell is written in full below the table, wrapped (a failed run's error, a long
    list of overrides)."""
    def natural(heads):
        return [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                for i, h in enumerate(heads)]

    def excess(ws):
        return sum(ws) + 2 * (len(ws) - 1) - width

    widths, heads = natural(header), [[h] for h in header]
    if excess(widths) > 0:  # first the headers of several words on two lines
        heads = [_two_lines(h) if i >= 3 else [h] for i, h in enumerate(header)]
        widths = [max(len(max(heads[i], key=len)), *(len(r[i]) for r in rows))
                  for i in range(len(header))] if rows else widths
    for column, narrowest in _NARROWED:  # then cut the text columns
        if excess(widths) <= 0:
            break
        widths[column] = max(narrowest, len(header[column]), widths[column] - excess(widths))
    cut = [(row[0], header[i], c) for row in rows for i, c in enumerate(row)
           if 0 < i < 3 and len(c) > widths[i]]

    def line(cells):
        return "  ".join(
            _cut(c, w, keep_end=i == 0).ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    depth = max(len(h) for h in heads)
    lines = [line([h[k - depth + len(h)] if k - depth + len(h) >= 0 else "" for h in heads])
             for k in range(depth)]
    lines += ["  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if cut:
        lines.append("")
        lines += [textwrap.fill(f"{run} {column}: {text}", width, subsequent_indent="    ",
                                break_on_hyphens=False) for run, column, text in cut]
    return "\n".join(lines)


def _two_lines(text: str) -> list[str]:
    """A header of several words as two lines of about equal length (one word: one line)."""
    words = text.split()
    if len(words) < 2:
        return [text]
    k = min(range(1, len(words)), key=lambda k: max(len(" ".join(words[:k])),
                                                      len(" ".join(words[k:]))))
    return [" ".join(words[:k]), " ".join(words[k:])]


def _cut(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` in ``width`` characters; a run's path keeps its end (its time and name)."""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if keep_end else text[:width - 1] + "…"


def _csv(value: float | None) -> str:
    """A number as people write it: integers whole (3383818, not 3.38382e+06), others with
    6 significant digits and no exponent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value.is_integer():
        return str(int(value))
    text = f"{value:.6g}"
    if "e" in text:
        text = f"{value:.12f}".rstrip("0").rstrip(".")
    return text


def _styles(n: int):
    """``n`` distinct (colour, line style, marker) triples: 10 colours, then the next style."""
    colours = [f"C{i}" for i in range(10)]
    dashes = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P"]
    return [(colours[i % 10], dashes[(i // 10) % 4], markers[(i // 40) % 6]) for i in range(n)]


def curve_points(run: RunRecord, key: str = "val_acc") -> tuple[list[int], list, list, list]:
    """(epochs, mean, low, high) of ``key``: a run's own curve (low = high = mean), or for a
    seed group the mean and min-max band over the epochs every member reached."""
    if not run.members:
        points = [(r["epoch"], r.get(key)) for r in run.history if r.get(key) is not None]
        ys = [y for _, y in points]
        return [e for e, _ in points], ys, ys, ys
    from transferlab.tools.tensorboard_views import group_curves

    curve = group_curves([m.history for m in run.members]).get(key, {})
    epochs = sorted(curve)
    return (epochs, [curve[e][0] for e in epochs], [curve[e][1] for e in epochs],
            [curve[e][2] for e in epochs])


LEGEND_MAX = 12  # runs named in the figure's legend; the others are drawn thin and grey


def plot_val_curves(runs: list[RunRecord], path: Path, title: str = "") -> Path:
    """:func:`val_curves_figure` saved as ``path`` (a PNG)."""
    fig = val_curves_figure(runs, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def val_curves_figure(runs: list[RunRecord], title: str = ""):
    """Validation accuracy of every run (a seed group: the mean, with its min-max band) in one
    figure, the legend beside the axes; dotted lines at stage boundaries. The legend names the
    :data:`LEGEND_MAX` best runs (by best val accuracy); the rest are thin grey lines, counted
    in one entry. A curve identical to one drawn before is said so in the legend, and each
    run's markers sit at other epochs, so curves on top of each other stay visible. Runs
    without accuracy (autoencoders) are left out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    shown = [(r, " ".join(lbl) or r.path.name) for r, lbl in
             zip(runs, varying_overrides(runs), strict=True) if curve_points(r)[0]]
    shown.sort(key=lambda item: -(item[0].value("best_val_acc") or 0.0))
    named, rest = shown[:LEGEND_MAX], shown[LEGEND_MAX:]
    longest = max((len(label) for _, label in named), default=10)
    fig = Figure(figsize=(7 + min(longest, 60) * 0.07, 4.8))
    ax = fig.add_subplot()
    epochs_seen = _draw_named(ax, named)
    for run, _ in rest:
        epochs, mean, _, _ = curve_points(run)
        epochs_seen.update(epochs)
        ax.plot(epochs, mean, color="0.6", linewidth=0.7, alpha=0.6, zorder=1)  # beneath
    if rest:
        ax.plot([], [], color="0.6", linewidth=0.7,
                label=f"{len(rest)} more run(s), lower best val acc")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs_seen:
        ax.set_xlim(min(epochs_seen) - 0.5, max(epochs_seen) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title or _plot_title(shown), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def _draw_named(ax, named: list[tuple[RunRecord, str]]) -> set[int]:
    """The legend's runs, each in its own style; the epochs they cover."""
    from transferlab.run.plots import stage_starts

    epochs_seen: set[int] = set()
    drawn: dict[tuple, str] = {}
    count = len(named)
    for i, ((run, name), (colour, dash, marker)) in enumerate(
            zip(named, _styles(count), strict=True)):
        epochs, mean, low, high = curve_points(run)
        epochs_seen.update(epochs)
        if run.runs > 1:
            name += f" (mean of {run.runs})"
            ax.fill_between(epochs, low, high, color=colour, alpha=0.15, linewidth=0)
        key = (tuple(epochs), tuple(mean))
        if key in drawn:
            name += f" (= {drawn[key]})"
        drawn.setdefault(key, name.split(" (")[0])
        every = max(1, min(count, len(epochs)))  # each run's markers at other epochs
        ax.plot(epochs, mean, color=colour, linestyle=dash, marker=marker, markersize=4,
                markevery=(i % every, every), label=name)
        for epoch, _ in stage_starts(run.history)[1:]:
            ax.axvline(epoch - 0.5, color=colour, linestyle=":", linewidth=1)
    return epochs_seen


def _plot_title(shown: list[tuple[RunRecord, str]]) -> str:
    """What the figure shows, naming only what is in it (bands, stage boundaries)."""
    from transferlab.run.plots import stage_starts

    notes = []
    if any(len(stage_starts(r.history)) > 1 for r, _ in shown):
        notes.append("dotted: stage boundaries")
    if any(r.runs > 1 for r, _ in shown):
        notes.append("band: min-max over seeds")
    return "validation accuracy" + (f" ({'; '.join(notes)})" if notes else "")








def statistics_lines(runs: list[RunRecord], root: Path | None = None) -> list[str]:
    """What the intervals are, the pairwise verdicts of ``runs`` (best first: see
    :func:`~transferlab.tools.compare_stats.pairs`) and the rows without predictions; none
    when no row has predictions."""
    if not any(r.scored is not None for r in runs):
        return []
    grouped = SEED_KEYS + FOLD_KEYS  # a group's own (seed=0,1,2): its test says how many
    labels = [" ".join(o for o in overrides if run.runs == 1 or _key_of(o) not in grouped)
              or _run_label(run, root)
              for run, overrides in zip(runs, varying_overrides(runs), strict=True)]
    return statistics_text(list(zip(labels, [r.scored for r in runs], strict=True)))


STATS_SUFFIX = ".compare_stats"


def write_tensorboard(root: Path, runs: list[RunRecord], groups: list[RunRecord],
                      keys: tuple[str, ...] = SEED_KEYS, statistics: list[str] = ()) -> None:
    """The union HParams record, the seed groups' curves and (``statistics``) the text
    ``compare/differences``, at ``root``, each replacing the one written there before."""
    from transferlab.tools.tensorboard_views import write_seed_groups, write_union_hparams

    write_union_hparams(root, [r.hparams for r in runs if r.hparams])
    write_seed_groups(root, {group_label(label, keys): [m.history for m in g.members]
                             for g, label in zip(groups, varying_overrides(groups), strict=True)
                             if g.runs > 1})
    if statistics:
        from torch.utils.tensorboard import SummaryWriter

        for old in root.glob(f"events.out.tfevents.*{STATS_SUFFIX}"):
            old.unlink()
        writer = SummaryWriter(log_dir=str(root), filename_suffix=STATS_SUFFIX)
        try:
            writer.add_text("compare/differences", "```\n" + "\n".join(statistics) + "\n```",
                            0)
        finally:
            writer.close()


def group_label(overrides: list[str], keys: tuple[str, ...] = SEED_KEYS) -> str:
    """A group's TensorBoard run name: what sets it apart (its overrides but the grouped keys,
    by default the seed), capped to a folder name's length (:func:`capped_name`)."""
    parts = [o for o in overrides if _key_of(o) not in keys]
    return capped_name("__".join(safe_name(o.replace("=", "-")) for o in parts) or "all")


def write_report(path: Path, runs: list[RunRecord], figure: Path | None,
                 root: Path | None, statistics: list[str] = ()) -> Path:
    """One Markdown file: the table, the paired statistics (:func:`statistics_lines`), the
    figure and the best run's overrides (first in ``runs``), to paste into an experiments/
    README."""

    lines = [f"# Runs under {root or 'the given paths'}", "", format_table(runs, "markdown",
                                                                          root=root), ""]
    if statistics:
        lines += [statistics[0], ""] + [f"- {line.strip()}" for line in statistics[1:]] + [""]
    if figure is not None:
        rel = os.path.relpath(figure, path.parent)
        lines += [f"![validation accuracy]({rel})", ""]
    if runs:
        best = runs[0]
        grouped = SEED_KEYS + FOLD_KEYS
        lines += ["Best run" + (f" (mean of {best.runs} runs)" if best.runs > 1 else "") +
                  f": `{best.path}`", "", "```", "transferlab-train " +
                  " ".join(o for o in best.overrides if _key_of(o) not in grouped or
                           best.runs == 1), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
