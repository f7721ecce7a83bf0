"""``transferlab-train``: compose a run with Hydra and train it.

    transferlab-train                                  # the default experiment
    transferlab-train backbone=resnet18 freeze=none    # override config groups / fields
    transferlab-train -m optimizer.lr=1e-3,1e-4        # a sweep (multirun)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from transferlab.cli import EXIT_JOB_FAILED, run_main
from transferlab.errors import UserError
from transferlab.runner import train
from transferlab.sweep import SweepSummary, remember_swept_keys

log = logging.getLogger("transferlab")


@hydra.main(version_base="1.3", config_path="pkg://transferlab.conf", config_name="train")
def _main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        result = train(cfg, run_dir, overrides=list(hc.overrides.task))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if hc.mode == RunMode.MULTIRUN:
            return None  # the sweep goes on; this job's metrics.json says why it failed
        sys.exit(2)
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


def _cli(argv: list[str]) -> int:
    remember_swept_keys(argv)
    _main()  # Hydra reads sys.argv itself
    return EXIT_JOB_FAILED if SweepSummary.failed_jobs else 0


def main() -> None:
    """Exit codes as for every script (:func:`transferlab.cli.run_main`): 1 when a sweep job
    failed, 130 and one ``interrupted`` line on Ctrl-C."""
    sys.exit(run_main(_cli))


if __name__ == "__main__":
    main()
