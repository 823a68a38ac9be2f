"""Wall-clock timing that is honest on both CPU and CUDA, and peak memory.

CUDA work is asynchronous: a repeat is timed with CUDA events recorded around it and one
synchronisation after it, so nothing inside the timed work has to synchronise. On CPU the
work is synchronous and ``time.perf_counter`` suffices.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timings:
    """Seconds of each timed repeat (after warm-up), the warm-up seconds, and their median."""

    repeats_s: list[float]
    warmup_s: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.repeats_s)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that ``fn()`` takes to finish on ``device`` (events + one sync on CUDA)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _synchronize(device)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000.0


def measure(
    fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> Timings:
    """Run ``fn`` ``warmup`` times untimed-for-the-result, then ``repeats`` timed runs."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}")
    warm = sum(time_once(fn, device) for _ in range(warmup))
    return Timings([time_once(fn, device) for _ in range(repeats)], warm)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak memory in MiB: CUDA's allocator peak since the last reset, or on CPU the
    process's peak resident set size (cumulative over the whole process: it cannot be reset)."""
    if device.type == "cuda":
        return {
            "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_memory_kind": "cuda max_memory_allocated since workload start",
        }
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = kib / 2**20 if sys.platform == "darwin" else kib / 2**10  # macOS reports bytes
    return {
        "peak_memory_mib": round(mib, 1),
        "peak_memory_kind": "process peak RSS so far (cumulative, CPU)",
    }
