"""Facts about the machine a benchmark ran on: CPU model and ISA flags, threads, GPU, versions,
date and load average (benchmarks on a shared machine are only comparable at similar load)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

# CPU flags that decide the fast paths: AVX-512 and its bf16 dot products, Intel AMX tiles.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> dict[str, str]:
    """The first processor block of ``/proc/cpuinfo`` (empty off Linux)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    block = path.read_text().split("\n\n", 1)[0]
    pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def cpu_facts() -> dict[str, Any]:
    """CPU model, logical CPUs usable by this process, and the ISA flags in ``ISA_FLAGS``."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": info.get("model name") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cores_per_socket": int(info["cpu cores"]) if "cpu cores" in info else None,
        "isa_flags": {flag: flag in flags for flag in ISA_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


def native_bf16(device: torch.device, flags: dict[str, bool] | None = None) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 natively, and why (one phrase).

    CUDA from capability 8.0 (Ampere) on; a CPU with AMX tiles (``amx_bf16``) or AVX512-BF16
    dot products (``avx512_bf16``). Elsewhere bf16 matmuls are emulated and run several times
    slower than fp32 (BENCHMARKS.md: 18× on an AVX2 machine). ``flags``: the CPU's
    ``ISA_FLAGS`` (default: read from ``/proc/cpuinfo``).
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return True, f"CUDA device of capability {major}.{minor} (≥ 8.0: native bf16)"
        return False, f"CUDA device of capability {major}.{minor} (< 8.0: bf16 is emulated)"
    if device.type != "cpu":
        return False, f"device {device.type!r}: native bf16 unknown"
    flags = cpu_facts()["isa_flags"] if flags is None else flags
    if not any(flags.values()):
        return False, "CPU flags unreadable (no /proc/cpuinfo): bf16 support unknown"
    if flags.get("amx_bf16"):
        return True, "CPU has AMX (amx_bf16: native bf16 tiles)"
    if flags.get("avx512_bf16"):
        return True, "CPU has AVX512-BF16 (native bf16 dot products)"
    return False, "CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated)"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (``uptime``), or None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_facts(device: torch.device) -> dict[str, Any]:
    """Everything ``bench.json`` records about where and when it was measured."""
    facts: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cpu": cpu_facts(),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return facts
