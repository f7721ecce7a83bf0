"""``transferlab-soup``: average the weights of a sweep's runs into a new run directory
(:mod:`transferlab.tools.soup`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.choices import CHECKPOINTS, SOUP_JSON, SOUP_METHODS, held_out_split
from transferlab.cli.args import Key, Spec, parse, run_main

if TYPE_CHECKING:
    from transferlab.tools.soup import SoupArgs

SPEC = Spec(
    prog="transferlab-soup",
    summary="Average the weights of a sweep's runs that share an architecture (a model soup) "
            "and write the soup as a run directory that transferlab-eval, -predict and -export "
            "read, with soup.json saying which runs went in. uniform averages them all; greedy "
            "adds runs best first, each only when the soup's accuracy on a held-out split "
            "improves (never val: the soup's accuracy is reported on val).",
    keys=(
        Key("sweep", "a sweep directory (transferlab-train -m): its runs are the candidates",
            Path, required=True, metavar="<sweep dir>"),
        Key("method", "uniform: the mean of every run; greedy: runs added best first while "
            "the held-out accuracy improves", default="uniform", choices=SOUP_METHODS),
        Key("held_out", "the split greedy chooses by (uniform: measured, not used): test, "
            "which the runs must have (e.g. dataset.test_fraction=0.1); val and train are "
            "refused", held_out_split, metavar="test"),
        Key("output", "the soup's run directory", Path, metavar="<dir>",
            default_text="<sweep dir>/soup_<method>"),
        Key("checkpoint", "which checkpoint of each run to average", default="best",
            choices=CHECKPOINTS),
        Key("device", "auto, cpu, cuda, cuda:N or mps", metavar="auto|cpu|cuda|...",
            default_text="the first run's trainer.device"),
    ),
    examples=(
        "transferlab-soup sweep=outputs/sweeps/2026-12-06/10-00-00_digits method=uniform",
        "transferlab-soup sweep=<sweep dir> method=greedy held_out=test output=soups/greedy",
        "transferlab-eval run=<sweep dir>/soup_uniform",
    ),
)


def parse_args(argv: list[str]) -> SoupArgs:
    """``key=value`` items -> :class:`SoupArgs`; mistakes are UserErrors."""
    parsed = parse(SPEC, argv)
    from transferlab.tools.soup import SoupArgs

    return SoupArgs(sweep=parsed["sweep"], method=parsed["method"], held_out=parsed["held_out"],
                    output=parsed["output"], checkpoint=parsed["checkpoint"],
                    device=parsed["device"])


def run_cli(argv: list[str]) -> None:
    """Parse, make and write the soup, print its table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from transferlab.tools.soup import soup_run, summary_lines

    record = soup_run(args)
    print("\n".join(summary_lines(record)))
    print(f"\nSoup run: {args.out_dir} (members and measures: {args.out_dir / SOUP_JSON})\n"
          f"Evaluate it: transferlab-eval run={args.out_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit codes as :func:`transferlab.cli.args.run_main` gives them."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
