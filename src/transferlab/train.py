"""``transferlab-train``: compose a run with Hydra and train it.

    transferlab-train                                  # the default experiment
    transferlab-train backbone=resnet18 freeze=none    # override config groups / fields
    transferlab-train -m optimizer.lr=1e-3,1e-4        # a sweep (multirun)

Exit codes: 0 done, 1 a sweep job failed, 2 bad input (one ``error:`` line, before any model
is built or image read), 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from transferlab.cli import EXIT_JOB_FAILED, run_main
from transferlab.config import composition_error
from transferlab.config.store import register_configs
from transferlab.errors import UserError
from transferlab.run import train
from transferlab.sweep import SweepSummary, remember_swept_keys

log = logging.getLogger("transferlab")


@hydra.main(version_base="1.3", config_path="pkg://transferlab.conf", config_name="train")
def _main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        result = train(cfg, run_dir, overrides=list(hc.overrides.task))
    except UserError as exc:
        if hc.mode != RunMode.MULTIRUN:
            # SystemExit passes through Hydra (it reports an Exception on lines of its own)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        # The sweep goes on; this job's metrics.json says why it failed.
        print(f"error: job {hc.job.num}: {exc}", file=sys.stderr, flush=True)
        return None
    except Exception as exc:
        if hc.mode != RunMode.MULTIRUN:
            raise
        # One broken job must not stop the sweep: its log keeps the traceback, its
        # metrics.json the first line; the summary at the end counts it as failed.
        log.exception("job failed")
        print(f"error: job {hc.job.num} failed: {exc}", file=sys.stderr, flush=True)
        return None
    print(f"\nRun saved to: {run_dir}\nOpen it in TensorBoard: tensorboard --logdir {run_dir}",
          flush=True)
    return result.best_val_acc


def _is_hydra_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("hydra", "omegaconf")


def _cli(argv: list[str]) -> int:
    register_configs()
    remember_swept_keys(argv)
    # Hydra re-raises instead of printing its multi-line report: every error is ours to show.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()  # Hydra reads sys.argv itself
    except Exception as exc:
        if not _is_hydra_error(exc):
            raise  # a bug: the traceback is what to report
        raise composition_error(exc) from None
    return EXIT_JOB_FAILED if SweepSummary.failed_jobs else 0


def main() -> None:
    """Exit codes as for every script (:func:`transferlab.cli.run_main`): 0 done, 1 a sweep
    job failed, 2 bad input (one ``error:`` line), 130 and one ``interrupted`` line on
    Ctrl-C."""
    sys.exit(run_main(_cli))


if __name__ == "__main__":
    main()
