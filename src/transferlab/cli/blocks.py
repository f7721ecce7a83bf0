"""``transferlab-blocks``: a backbone's blocks as freeze policies name them, without starting a
run (:mod:`transferlab.tools.blocks`)."""

from __future__ import annotations

import sys

from transferlab.cli.args import Key, Prefix, Spec, parse, run_main, yaml_value
from transferlab.registry import BACKBONE_SOURCES

SPEC = Spec(
    prog="transferlab-blocks",
    summary="List a backbone's blocks, input to output, with their index from the start and "
            "from the end, parameter counts and modules: the names and indices that freeze "
            "policies select (blocks[-2:], freeze.k=, freeze.fine_tune_at=). Built from the "
            "architecture alone: nothing is downloaded, no run is started.",
    keys=(
        Key("backbone", "a backbone preset (conf/backbone), or a torchvision or timm model name",
            required=True, metavar="<name>"),
        Key("backbone_source", "where the model comes from",
            choices=tuple(BACKBONE_SOURCES.names()), default_text="the preset's, else guessed"),
    ),
    prefixes=(Prefix("backbone.", "a field of the backbone's config, e.g. "
                     "backbone.weights_path=<file> with backbone.pretrained=true"),),
    examples=(
        "transferlab-blocks backbone=efficientnet_lite0",
        "transferlab-blocks backbone=resnet50",
        "transferlab-blocks backbone=convnext_nano backbone_source=timm",
    ),
)


def run_cli(argv: list[str]) -> None:
    parsed = parse(SPEC, argv)
    from transferlab.tools.blocks import show_blocks

    fields = {key.removeprefix("backbone."): yaml_value(value)
              for key, value in parsed.prefixed.items()}
    print(show_blocks(parsed["backbone"], parsed["backbone_source"], fields), flush=True)


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab-blocks`` entry point; the exit code: 0, 2 after one ``error:`` line."""
    return run_main(run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
