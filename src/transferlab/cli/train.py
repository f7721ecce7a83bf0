"""``transferlab-train``: compose a run with Hydra and train it.

    transferlab-train                                  # the default experiment
    transferlab-train backbone=resnet18 freeze=none    # override config groups / fields
    transferlab-train -m optimizer.lr=1e-3,1e-4        # a sweep (multirun)
    torchrun --nproc_per_node=4 -m transferlab.train   # one run on 4 GPUs (DDP)

``--help`` is answered here, from the config alone (no torch is imported); everything else goes
to :func:`transferlab.run.jobs.launch`. Exit codes: 0 done, 1 a sweep job failed, 2 bad input
(one ``error:`` line, before any model is built or image read), 130 interrupted.
"""

from __future__ import annotations

import string
import sys

from transferlab.cli.args import run_main

HELP_FLAGS = ("--help", "-h")


def help_text(argv: list[str]) -> str:
    """``--help``: the text ``hydra.help`` of conf/train.yaml describes, for the config the other
    arguments compose. Hydra's own ``--help`` prints the same, but first lists every config
    group of the ConfigStore for placeholders our template does not use, deep-copying the whole
    store once per group (163 copies of every option's schema: seconds)."""
    from omegaconf import OmegaConf, flag_override

    from transferlab.config import compose_config

    overrides = [a for a in argv if a not in HELP_FLAGS and not a.startswith("-")]
    cfg = compose_config(overrides, with_hydra=True)
    template = cfg.hydra.help.template
    with flag_override(cfg, ["struct", "readonly"], False):
        del cfg["hydra"]
    return string.Template(template).safe_substitute(CONFIG=OmegaConf.to_yaml(cfg))


def _cli(argv: list[str]) -> int:
    if any(a in HELP_FLAGS for a in argv):
        print(help_text(argv), end="", flush=True)
        return 0
    from transferlab.run.jobs import launch

    return launch(argv)


def main() -> None:
    """Exit codes as for every script (:func:`transferlab.cli.args.run_main`): 0 done, 1 a sweep
    job failed, 2 bad input (one ``error:`` line), 130 and one ``interrupted`` line on
    Ctrl-C."""
    sys.exit(run_main(_cli))


if __name__ == "__main__":
    main()
