"""The machine's own ceiling: the FLOP rate of a large square matrix product in one dtype.

Model FLOP utilisation (MFU) is reported against this *measured* rate, not a datasheet peak,
so it says how close the model gets to what this machine, library and dtype can do.

Two layouts are timed, ``A @ Bᵀ`` (the layout of ``nn.Linear``) and ``A @ B``, and the faster
one is the ceiling: on CPUs without bf16 instructions the libraries take very different
paths for the two (measured on AVX2 at n = 2048: bf16 ``A @ Bᵀ`` ≈ 20 GFLOP/s, ``A @ B`` ≈ 0.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from denoiselab.bench.timing import measure, time_once

Product = Callable[[Tensor, Tensor], Tensor]
LAYOUTS: dict[str, Product] = {
    "a@b.T": F.linear,  # nn.Linear: x @ Wᵀ with W stored [out, in]
    "a@b": torch.matmul,
}


def _operands(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = torch.Generator(device).manual_seed(n)
    a, b = torch.randn(2, n, n, device=device, dtype=dtype, generator=gen)
    return a, b


def _pick_size(device: torch.device, dtype: torch.dtype, cap: int, min_seconds: float) -> int:
    """Double ``n`` from 256 until one ``A @ Bᵀ`` takes ``min_seconds`` or ``n`` hits ``cap``."""
    n = 256
    while 2 * n <= cap:
        a, b = _operands(n, device, dtype)
        F.linear(a, b)  # first call: library initialisation, kernel selection
        if time_once(lambda a=a, b=b: F.linear(a, b), device) >= min_seconds:
            break
        n *= 2
    return n


def _rate(
    product: Product, a: Tensor, b: Tensor, device: torch.device, min_seconds: float, repeats: int
) -> float:
    """GFLOP/s of ``product(a, b)``: median of ``repeats`` timings of about ``min_seconds``
    each, or the single first timing when one product already takes 10 × ``min_seconds``
    (bf16 ``A @ B`` on AVX2 CPUs: about a minute at n = 2048)."""
    flops = 2.0 * a.shape[0] ** 3
    first = time_once(lambda: product(a, b), device)  # also the warm-up
    if first > 10 * min_seconds:
        return flops / first / 1e9
    inner = max(1, math.ceil(min_seconds / first))

    def products() -> None:
        for _ in range(inner):
            product(a, b)

    timings = measure(products, device, warmup=0, repeats=repeats)
    return flops * inner / timings.median_s / 1e9


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
    n = _pick_size(device, dtype, cap, min_seconds)
    a, b = _operands(n, device, dtype)
    rates = {name: _rate(f, a, b, device, min_seconds, repeats) for name, f in LAYOUTS.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "size": n,
        "gflops_per_s_by_layout": rates,
        "gflops_per_s": max(rates.values()),
    }
