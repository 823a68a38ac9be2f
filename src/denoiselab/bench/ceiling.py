"""The machine's own ceiling: the FLOP rate of a large square matrix product in one dtype.

Model FLOP utilisation (MFU) is reported against this *measured* rate, not a datasheet peak,
so it says how close the model gets to what this machine, library and dtype can do.

Two layouts are timed, ``A @ B`` and ``A @ Bᵀ`` (the layout of ``nn.Linear``), and the faster
one is the ceiling: on CPUs without bf16 instructions the libraries take very different
paths for the two (measured on AVX2: bf16 ``A @ B`` ≈ 1 GFLOP/s, ``A @ Bᵀ`` ≈ 9 GFLOP/s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from denoiselab.bench.timing import measure, time_once

LAYOUTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "a@b": torch.matmul,
    "a@b.T": F.linear,  # nn.Linear: x @ Wᵀ with W stored [out, in]
}


def _pick_size(
    a_b: Callable[[int], tuple[Tensor, Tensor]], device: torch.device, cap: int, min_seconds: float
) -> tuple[int, float]:
    """Double ``n`` from 256 until one ``A @ Bᵀ`` takes ``min_seconds`` or ``n`` hits ``cap``."""
    n = 256
    while True:
        a, b = a_b(n)
        F.linear(a, b)  # first call: library initialisation, kernel selection
        single = time_once(lambda a=a, b=b: F.linear(a, b), device)
        if single >= min_seconds or 2 * n > cap:
            return n, single
        n *= 2


def matmul_ceiling(
    device: torch.device,
    dtype: torch.dtype,
    *,
    max_size: int | None = None,
    min_seconds: float = 0.2,
    repeats: int = 5,
) -> dict[str, Any]:
    """FLOP/s of square ``n × n`` products in ``dtype`` (2·n³ FLOPs each), best layout.

    ``n`` doubles from 256 until one product takes ``min_seconds`` or reaches ``max_size``
    (default 4096 on CPU, 16384 on CUDA), so slow dtypes stay affordable. Each timed repeat
    runs enough products to last about ``min_seconds``; rates are medians over ``repeats``.
    """
    cap = max_size or (16384 if device.type == "cuda" else 4096)
    gen = torch.Generator(device).manual_seed(0)

    def a_b(n: int) -> tuple[Tensor, Tensor]:
        return tuple(torch.randn(2, n, n, device=device, dtype=dtype, generator=gen))  # type: ignore[return-value]

    n, single = _pick_size(a_b, device, cap, min_seconds)
    a, b = a_b(n)
    inner = max(1, math.ceil(min_seconds / max(single, 1e-9)))
    rates: dict[str, float] = {}
    for name, product in LAYOUTS.items():

        def products(product: Callable[[Tensor, Tensor], Tensor] = product) -> None:
            for _ in range(inner):
                product(a, b)

        timings = measure(products, device, warmup=1, repeats=repeats)
        rates[name] = 2.0 * n**3 * inner / timings.median_s / 1e9
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "size": n,
        "products_per_repeat": inner,
        "gflops_per_s_by_layout": rates,
        "gflops_per_s": max(rates.values()),
    }
