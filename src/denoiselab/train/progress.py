"""A one-line progress bar for interactive runs: loss, images/s and ETA, redrawn in place.

Drawn only when the stream is a terminal (log files and CI keep the plain periodic log lines),
at most every ``min_interval`` seconds, so the host synchronisation that reading the loss
costs stays negligible on a GPU.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressBar:
    """``update(step, loss)`` after each optimizer step; ``clear()`` before printing a line."""

    def __init__(
        self,
        total: int,
        start: int,
        images_per_step: int,
        stream: TextIO,
        *,
        enabled: bool | None = None,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total, self.images_per_step, self.stream = total, images_per_step, stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.min_interval, self.clock = min_interval, clock
        self.t0, self.step0 = clock(), start
        self.last_draw = -math.inf
        self.width = 0

    def update(self, step: int, loss: Callable[[], float]) -> None:
        """Redraw for ``step`` steps done; ``loss()`` is only called when the bar is drawn."""
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last_draw < self.min_interval and step < self.total:
            return
        self.last_draw = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (step - self.step0) * self.images_per_step / elapsed
        eta = (self.total - step) * self.images_per_step / rate if rate > 0 else math.inf
        frac = step / self.total
        cols = shutil.get_terminal_size((100, 20)).columns
        text = (
            f" {100 * frac:3.0f}% step {step}/{self.total} | loss {loss():.4f} | "
            f"{rate:.1f} img/s | ETA {format_duration(eta)}"
        )
        bar_width = max(10, min(30, cols - len(text) - 3))
        filled = round(bar_width * frac)
        line = f"[{'#' * filled}{'.' * (bar_width - filled)}]{text}"[: cols - 1]
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def clear(self) -> None:
        """Erase the bar so that a log line can be printed; the next update redraws it."""
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
            self.last_draw = -math.inf
