"""The progress display on rank 0: tqdm's bar in a terminal, plain periodic lines anywhere else.

A bar redraws one line with carriage returns; written to a log file or a pipe (pdsh, a scheduler's log) that makes
one line of thousands of characters. When stderr is not a terminal, a line like

    step 120/880 (14%) [full] loss 1.2345 lr 1.00e-03 img_s 430, 0:00:52 elapsed, 0:05:29 left

goes to stdout at most every `interval_s` seconds and at the last step, as tqdm and DeepSpeed users expect from a
non-interactive job.
"""

from __future__ import annotations

import datetime
import sys
import time

from prelora_ds.log import logger, set_progress_bar

LINE_INTERVAL_S = 30.0


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class BarProgress:
    """tqdm's bar; log lines go through it (`log.set_progress_bar`) so they do not tear it."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0)
        set_progress_bar(self.bar)

    def update(self, step: int, postfix: dict[str, str]) -> None:
        self.bar.n = step
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(0)

    def close(self) -> None:
        set_progress_bar(None)
        self.bar.close()


class LineProgress:
    """One plain line at most every `interval_s` (and at the last step), through the package logger."""

    def __init__(self, total: int, initial: int, interval_s: float = LINE_INTERVAL_S) -> None:
        self.total, self.initial, self.interval_s = total, initial, interval_s
        self.start = self.last = time.monotonic()
        self.shown = initial  # the last step a line was written for
        self.postfix: dict[str, str] = {}

    def line(self, step: int, now: float) -> str:
        share = f" ({100 * step / self.total:.0f}%)" if self.total else ""
        phase = self.postfix.get("phase")
        fields = " ".join(f"{k} {v}" for k, v in self.postfix.items() if k != "phase")
        elapsed = now - self.start
        text = f"step {step}/{self.total}{share}" + (f" [{phase}]" if phase else "") + (f" {fields}" if fields else "")
        done = step - self.initial
        left = f", {_clock(elapsed / done * (self.total - step))} left" if done > 0 and self.total >= step else ""
        return f"{text}, {_clock(elapsed)} elapsed{left}"

    def update(self, step: int, postfix: dict[str, str]) -> None:
        self.postfix.update(postfix)
        now = time.monotonic()
        if step > self.shown and (now - self.last >= self.interval_s or step == self.total):
            self.last, self.shown = now, step
            logger.info(self.line(step, now))

    def close(self) -> None:
        pass


def open_progress(total: int, initial: int) -> BarProgress | LineProgress:
    """A bar when a person watches a terminal (stderr is one, where tqdm draws), else plain lines."""
    return BarProgress(total, initial) if sys.stderr.isatty() else LineProgress(total, initial)
