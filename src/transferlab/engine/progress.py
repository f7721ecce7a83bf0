"""What a pass over a loader shows while it runs: a tqdm bar on a terminal; off a terminal
(``nohup``, a CI log, a SLURM job's file) a log line every ``progress_every`` seconds, as
Keras and Lightning print there; or nothing.

    epoch 2/5 [finetune] step 120/450 (27%) | 85.3 images/s | loss 0.4123 acc 0.873 | ETA 1m05s

A pass shorter than the interval prints no line: a short run's log stays as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("transferlab")


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Wraps a pass's loader (iterate it) and is told of every batch (:meth:`update`).

    ``bar``: a tqdm bar; else ``every`` > 0: a log line when that many seconds have passed
    since the last one; else nothing. ``total`` batches in the pass, ``initial`` of them done
    before (a resumed epoch). ``clock``: the time source (tests pass their own)."""

    def __init__(self, iterable: Iterable, desc: str, *, bar: bool, every: float, total: int,
                 initial: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.desc, self.total, self.every, self.clock = desc, total, every, clock
        self.bar = (tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, initial=initial,
                         total=total) if bar else None)
        self.iterable = iterable
        self.steps = self.initial = initial
        self.images = 0
        self.start = self.last = clock()

    @property
    def wants_postfix(self) -> bool:
        """Whether :meth:`update` shows figures (the caller computes them only then)."""
        return self.bar is not None or self.every > 0

    def __iter__(self) -> Iterator:
        return iter(self.bar if self.bar is not None else self.iterable)

    def update(self, images: int, figures: Callable[[], dict[str, str]] | None = None) -> None:
        """One batch of ``images`` done; ``figures()``: the running loss/accuracy to show."""
        self.steps += 1
        self.images += images
        if self.bar is not None:
            if figures is not None:
                self.bar.set_postfix(**figures())
            return
        if self.every <= 0:
            return
        now = self.clock()
        if now - self.last >= self.every and self.steps < self.total:
            self.last = now
            log.info("%s", self.line(now, figures() if figures is not None else {}))

    def line(self, now: float, figures: dict[str, Any]) -> str:
        """``<desc> step k/n (p%) | r images/s | figures | ETA t``."""
        elapsed = max(now - self.start, 1e-9)
        done = self.steps - self.initial
        parts = [f"{self.desc} step {self.steps}/{self.total} "
                 f"({100 * self.steps / max(self.total, 1):.0f}%)",
                 f"{self.images / elapsed:.1f} images/s"]
        if figures:
            parts.append(" ".join(f"{k} {v}" for k, v in figures.items()))
        if done > 0:
            parts.append(f"ETA {duration((self.total - self.steps) * elapsed / done)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
