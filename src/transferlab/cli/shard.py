"""``transferlab-shard``: an image folder written as WebDataset tar shards
(:mod:`transferlab.tools.shard`), for ``dataset=webdataset``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transferlab.cli.args import Key, Spec, parse, positive_int, run_main

SPEC = Spec(
    prog="transferlab-shard",
    summary="Write an image folder (train/ val/ [test/] of class folders, or class folders: "
            "one train split) as WebDataset tar shards <split>-NNNNNN.tar of at most maxcount "
            "samples (<key>.jpg + <key>.cls), with index.json beside them (classes, counts, "
            "offsets). Train from them with dataset=webdataset dataset.urls=<pattern>.",
    keys=(
        Key("root", "the image folder", Path, metavar="<folder>", required=True),
        Key("output", "the folder to write the shards into (no .tar files in it yet)", Path,
            metavar="<dir>", required=True),
        Key("maxcount", "samples per shard at most", positive_int, 1000),
    ),
    examples=(
        "transferlab-shard root=$TRANSFERLAB_DATA_DIR/hymenoptera output=shards/hymenoptera "
        "maxcount=100",
        "transferlab-shard root=/data/pets output=/data/pets-shards",
    ),
)


def run_cli(argv: list[str]) -> int:
    args = parse(SPEC, argv)
    from transferlab.tools.shard import write_shards  # (torch: not for --help)

    report = write_shards(args["root"], args["output"], args["maxcount"])
    for split, info in report.splits.items():
        key = "urls" if split == "train" else f"{split}_urls"
        print(f"{split}: {info['count']} samples in {len(info['shards'])} shard(s): "
              f"\"dataset.{key}='{info['urls']}'\"")
    if report.skipped:
        print(f"skipped {len(report.skipped)} file(s) that are not readable images: "
              f"{', '.join(report.skipped[:5])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-shard`` entry point; the exit code: 0, 2 after one ``error:
    <message>`` line for a user error, 130 when interrupted."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
