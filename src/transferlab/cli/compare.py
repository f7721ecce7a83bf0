"""``transferlab-compare``: a table, a figure and TensorBoard views of runs and sweeps
(:mod:`transferlab.tools.compare`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transferlab.cli.args import Key, Spec, boolean, os_error_line, parse, path, run_main
from transferlab.errors import UserError
from transferlab.tools.compare import (
    FOLD_KEYS,
    FORMATS,
    METRICS,
    SEED_KEYS,
    find_runs,
    format_table,
    group_runs,
    plot_val_curves,
    sort_runs,
    statistics_lines,
    write_report,
    write_tensorboard,
)


def plot_target(text: str) -> Path | bool:
    """``plot=``: true/false (or 1/0, yes/no), else the figure's path."""
    try:
        return boolean(text)
    except ValueError:
        return path(text)


SPEC = Spec(
    prog="transferlab-compare",
    usage="transferlab-compare [PATH ...] [key=value ...]",
    summary="Compare transferlab runs: a table of every run under the given sweep directories, "
            "run directories or outputs/ (read from their metrics.json, so partial sweeps and "
            "runs still going work too), best first, with each run's (or group's) 95 % interval "
            "and paired tests under the table (from the runs' predictions_val.npz), and a "
            "figure of their validation accuracy.",
    keys=(
        Key("sort", "the metric to sort by, best first", default="best_val_acc",
            choices=tuple(METRICS)),
        Key("reverse", "worst first", bool, False),
        Key("format", "the table's format", default="table", choices=FORMATS),
        Key("group_seeds", "merge runs that differ only by seed: mean ± std", bool, False),
        Key("group_folds", "merge runs that differ only by dataset.fold (the folds of a k-fold "
            "cross-validation): mean ± std over the folds; with group_seeds, over both",
            bool, False),
        Key("plot", "where to write the validation-accuracy figure; false: no figure",
            plot_target, metavar="<file>|true|false",
            default_text="<first path>/compare_val_acc.png, none with format=csv"),
        Key("tensorboard", "write the runs' union HParams record (and, with group_seeds, the "
            "seed groups' mean / min / max curves; the paired statistics as the text "
            "compare/differences) at the first path, and print the command that opens them in "
            "TensorBoard", bool, False),
        Key("all", "show failed runs too (hidden by default)", bool, False),
        Key("rung", "a halving sweep as it stood at rung N: the configurations that ran in it, "
            "their records up to its budget, 'went on' for those that went on", int,
            metavar="<N>"),
        Key("report", "write a Markdown report: the table, the paired statistics, the figure "
            "and the best run's overrides", path, metavar="<file.md>"),
    ),
    positionals="PATH",
    positional_help="sweep or run directories, searched recursively (default: outputs)",
    notes=("A directory whose text before its first '=' looks like a key (lr=0.1) is read as "
           "key=value: write it as ./lr=0.1.",),
    examples=(
        "transferlab-compare outputs/sweeps/2026-11-23/10-00-00_digits-efficientnet_lite0-"
        "linear_probe",
        "transferlab-compare outputs/ sort=final_val_loss format=markdown plot=false",
        "transferlab-compare <sweep> group_seeds=true group_folds=true format=csv",
        "transferlab-compare <sweep> group_seeds=true report=results.md tensorboard=true",
    ),
)


HIDDEN = ("failed",)


def run_cli(argv: list[str]) -> int:
    """Parse, read the runs, print the table, write the figure (and the TensorBoard records,
    the report)."""
    parsed = parse(SPEC, argv)
    paths = [Path(p) for p in parsed.positionals] or [Path("outputs")]
    try:
        runs = find_runs(paths)
    except FileNotFoundError as exc:
        raise UserError(f"{exc}: give a sweep directory, a run directory or outputs/") from None
    if not runs:
        raise UserError(f"no runs (no metrics.json) under {' '.join(map(str, paths))}")
    if parsed["rung"] is not None:
        from transferlab.tools.halving import runs_at_rung

        runs = runs_at_rung(runs, paths[0], parsed["rung"])
    hidden = [] if parsed["all"] else [r for r in runs if r.status in HIDDEN]
    runs = [r for r in runs if r not in hidden]
    every = runs
    keys = (SEED_KEYS if parsed["group_seeds"] else ()) + (
        FOLD_KEYS if parsed["group_folds"] else ())
    if keys:
        runs = group_runs(runs, keys)
    runs = sort_runs(runs, parsed["sort"], parsed["reverse"])
    root = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
    print(format_table(runs, parsed["format"], root=root) if runs else "(no runs to show)")
    statistics = statistics_lines(runs, root)
    if statistics and parsed["format"] != "csv":  # csv: the intervals are columns
        print("\n" + "\n".join(statistics))
    if hidden:
        print(f"({len(hidden)} failed run(s) hidden: all=true shows them)", file=sys.stderr)
    plot = parsed["plot"]
    figure = None
    base = paths[0] if paths[0].is_dir() else paths[0].parent
    if runs and (plot is True or isinstance(plot, Path)
                 or (plot is None and parsed["format"] != "csv")
                 or (parsed["report"] and plot is not False)):
        target = plot if isinstance(plot, Path) else (
            parsed["report"].parent / (parsed["report"].stem + "_val_acc.png")
            if parsed["report"] else base / "compare_val_acc.png")
        try:
            figure = plot_val_curves(runs, target)
            print(f"\nValidation curves: {figure}", file=sys.stderr)
        except OSError as exc:
            if plot is not None:  # a figure asked for (plot=, report=): the command failed
                raise
            print(f"warning: no figure: {os_error_line(exc)} (plot=<file> puts it elsewhere)",
                  file=sys.stderr)  # a read-only sweep: the table is what was asked for
    if parsed["report"]:
        report = write_report(parsed["report"], runs, figure, root, statistics)
        print(f"Report: {report}", file=sys.stderr)
    if parsed["tensorboard"]:
        write_tensorboard(base, every, runs if keys else [], keys, statistics)
        logdirs = " ".join(str(p) for p in paths)
        if len(paths) == 1:
            print(f"\ntensorboard --logdir {logdirs}")
        else:
            spec = ",".join(f"{p.name or p}:{p}" for p in paths)
            print(f"\ntensorboard --logdir_spec {spec}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-compare`` entry point; the exit code: 0, 2 after one
    ``error: <message>`` line for a user error, 130 when interrupted."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
