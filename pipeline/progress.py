"""The live progress line of ``mmpipe run`` on a terminal: rows done of the plan's total, rows/s,
rejects so far, time left. Written over itself (``\\r``) on stderr at most twice a second; nothing
at all when stderr is not a terminal (log files, Ray jobs), where the run's log lines and its
record say the same. Ray Data's own per-operator bars (``ray.progress_bars``) would draw over it,
so it stands aside when they are on. Hand-written: tqdm's bar needs a count per row and owns the
line's format; this is one f-string."""
from __future__ import annotations

import sys
import time
from typing import TextIO

import numpy as np


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts the original rows (augmented copies aside) of each processed batch."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None,
                 interval_s: float = 0.5, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.rejected = total, 0, 0
        self.interval_s, self.clock = interval_s, clock
        self.started = clock()
        self._shown = float("-inf")
        self._width = 0

    def add(self, batch: dict) -> None:
        originals = np.asarray(batch["aug"]).astype(np.int64) == 0
        self.done += int(np.count_nonzero(originals))
        reasons = np.asarray(batch["reject_reason"], dtype=object)
        self.rejected += int(np.count_nonzero(originals & (reasons != "") & (reasons != None)))  # noqa: E711
        if self.enabled and self.clock() - self._shown >= self.interval_s:
            self._show()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = (self.total - self.done) / rate if rate > 0 and self.total > self.done else None
        eta = f" · {_duration(left)} left" if left is not None else ""
        return (f"processing: {self.done:,} of {self.total:,} rows{share} · {rate:,.0f} rows/s"
                f" · {self.rejected:,} rejected{eta}")

    def _show(self) -> None:
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width, self._shown = len(text), self.clock()

    def close(self) -> None:
        """The last count, then the line is left as it is (the run's summary follows below it)."""
        if self.enabled and self.done:
            self._show()
            self.stream.write("\n")
            self.stream.flush()
