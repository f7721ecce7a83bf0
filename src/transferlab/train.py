"""``python -m transferlab.train`` and ``torchrun ... -m transferlab.train``: the same command
as ``transferlab-train`` (:mod:`transferlab.cli.train`), under the module name torchrun and
the docs use."""

from transferlab.cli.train import main

if __name__ == "__main__":
    main()
