"""Progress off a terminal: a log line at an interval (steps, images/s, figures, ETA); a bar on
a terminal; nothing when asked. Through the real console script too (its stdout is a pipe)."""

from __future__ import annotations

import logging
import re

import pytest

from transferlab.engine.progress import Progress, duration

from .conftest import TINY, cli


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transferlab"]


def test_a_line_every_interval_with_rate_figures_and_eta(caplog):
    clock = Clock()
    progress = Progress(range(10), "epoch 1/3 [head]", bar=False, every=30, total=10,
                        clock=clock)
    caplog.set_level(logging.INFO, logger="transferlab")
    seen = []
    for step in progress:
        clock.now += 10  # 10 s a batch of 32 images
        progress.update(32, lambda: {"loss": "0.5000", "acc": "0.800"})
        seen.append(step)
    assert seen == list(range(10))
    # 30 s after the start, then every 30 s; none at the pass's last batch (the epoch line says it)
    assert lines(caplog) == [
        "epoch 1/3 [head] step 3/10 (30%) | 3.2 images/s | loss 0.5000 acc 0.800 | ETA 1m10s",
        "epoch 1/3 [head] step 6/10 (60%) | 3.2 images/s | loss 0.5000 acc 0.800 | ETA 40s",
        "epoch 1/3 [head] step 9/10 (90%) | 3.2 images/s | loss 0.5000 acc 0.800 | ETA 10s",
    ]


def test_a_resumed_pass_counts_from_where_it_was_and_its_eta_from_its_own_pace(caplog):
    clock = Clock()
    progress = Progress(range(4), "train", bar=False, every=5, total=10, initial=6, clock=clock)
    caplog.set_level(logging.INFO, logger="transferlab")
    for _ in progress:
        clock.now += 5
        progress.update(8)
    assert lines(caplog)[0] == "train step 7/10 (70%) | 1.6 images/s | ETA 15s"


def test_no_line_when_off_or_shorter_than_the_interval(caplog):
    caplog.set_level(logging.INFO, logger="transferlab")
    for every in (0.0, 1000.0):
        clock = Clock()
        progress = Progress(range(5), "val", bar=False, every=every, total=5, clock=clock)
        assert progress.wants_postfix == (every > 0)
        for _ in progress:
            clock.now += 1
            progress.update(4, lambda: pytest.fail("figures asked for nothing to show"))
    assert lines(caplog) == []


def test_a_bar_shows_the_figures_instead_of_lines(caplog, capsys):
    caplog.set_level(logging.INFO, logger="transferlab")
    progress = Progress(range(3), "train", bar=True, every=0.0, total=3)
    for _ in progress:
        progress.update(2, lambda: {"loss": "1.0000"})
    progress.close()
    assert lines(caplog) == [] and "loss=1.0000" in capsys.readouterr().err


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (45, "45s"), (185, "3m05s"),
                                               (7620, "2h07m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


@pytest.mark.slow
def test_a_run_off_a_terminal_logs_progress_lines(tmp_path):
    """``transferlab-train`` with its output to a pipe (as under nohup or in a CI log):
    progress lines at ``trainer.progress_seconds``; ``trainer.progress=false``: none."""
    proc = cli([*TINY, "trainer.progress=null", "trainer.progress_seconds=0.000001"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = re.findall(r"step (\d+)/(\d+) \(\d+%\) \| [\d.]+ images/s \| loss [\d.]+ acc [\d.]+ "
                       r"\| ETA \d+s", proc.stdout)
    assert found and all(int(k) < int(n) for k, n in found), proc.stdout
    (tmp_path / "quiet").mkdir()
    quiet = cli([*TINY, "trainer.progress_seconds=0.000001"], tmp_path / "quiet")  # progress=false
    assert quiet.returncode == 0 and " images/s " not in quiet.stdout + quiet.stderr
