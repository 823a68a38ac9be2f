"""Which operators dominate: a ``torch.profiler`` table of one run of a workload."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def top_ops_table(fn: Callable[[], object], device: torch.device, rows: int = 15) -> str:
    """Profile one call of ``fn`` (already warmed up); ops sorted by self time on ``device``."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
