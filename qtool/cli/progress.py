"""Progress of a long run, as the library's `on_progress(done, total, name)` reports it.

In a terminal: one line, rewritten in place, never wider than the terminal. In a pipe or a CI log: a plain line
every `interval` seconds (and one at the end), so a log shows the run is alive. Both say done/total, rate and
ETA. The rate is the average since the run started, and is shown only after a second: the first tensors are
often copied, not quantized, and would give an absurd first rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLine:
    def __init__(self, stream: TextIO, *, total: int, size: Callable[[float], str], tty: bool, width: int = 80,
                 interval: float = 5.0, min_rate_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.stream, self.total, self.size, self.tty = stream, total, size, tty
        self.width, self.interval, self.min_rate_seconds, self.clock = max(width, 20), interval, min_rate_seconds, clock
        self.start = clock()
        self.last_shown: float | None = None
        self.done = 0
        self.drawn = False
        self.finished = False

    def line(self, done: int, now: float, name: str = "") -> str:
        total = max(self.total, 1)
        elapsed = now - self.start
        text = f"quantize {self.size(done)} / {self.size(self.total)} ({100 * done / total:.0f}%)"
        if elapsed >= self.min_rate_seconds and done > 0:
            rate = done / elapsed
            text += f", {self.size(rate)}/s, ETA {_clock((self.total - done) / rate)}"
        if self.tty and name:
            room = self.width - 1 - len(text) - 2
            if room >= 8:
                text += "  " + (name if len(name) <= room else "…" + name[-(room - 1):])
        return text[: self.width - 1] if self.tty else text

    def __call__(self, done: int, total: int, name: str = "") -> None:
        self.done, self.total = done, total
        now = self.clock()
        if self.tty:
            if self.last_shown is None or now - self.last_shown >= 0.1 or done >= total:
                self.stream.write("\r" + self.line(done, now, name).ljust(self.width - 1))
                self.stream.flush()
                self.last_shown, self.drawn = now, True
        elif not self.finished and (done >= total or now - (self.last_shown or self.start) >= self.interval):
            self.stream.write(self.line(done, now) + "\n")
            self.stream.flush()
            self.last_shown, self.finished = now, done >= total

    def close(self) -> None:
        """Clear the terminal line (the result follows on stdout)."""
        if self.tty and self.drawn:
            self.stream.write("\r" + " " * (self.width - 1) + "\r")
            self.stream.flush()
