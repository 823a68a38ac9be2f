#!/usr/bin/env python
"""Forward + backward of one attention: SDPA (on the CPU, its flash kernel) against the
explicit product ``softmax(q·kᵀ/√d)·v`` of ``models.fused.attention``, by number of keys.

This is the measurement behind ``models.fused.SHORT_KEYS``: below it the explicit product
is used on the CPU in float32. Shapes default to JiT-T/4 at batch 64 (3 heads of 64).
Each size alternates the two kernels ``--rounds`` times (median of ``--repeats`` calls each
time) and reports the median over rounds, with ``uptime`` before and after.

    python benchmarks/attention_kernels.py --threads 2 --keys 64 72 96 128 160 192 256 576
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from denoiselab.models import fused


def _median_ms(fn, args: tuple, grad: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).backward(grad)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return str(os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--keys", type=int, nargs="+", default=[64, 72, 96, 128, 160, 192, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    explicit = torch.ops.denoiselab.short_attention.default  # the op behind fused.attention
    kernels = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "explicit": lambda q, k, v: explicit(q, k, v.contiguous())[0],
    }
    print(f"start: {_uptime()}")
    print(f"SHORT_KEYS = {fused.SHORT_KEYS}; torch {torch.__version__}, {args.threads} threads")
    print("keys | SDPA ms | explicit ms | SDPA / explicit")
    rows = []
    for n in args.keys:
        gen = torch.Generator().manual_seed(n)
        shape = (args.batch, args.heads, n, args.head_dim)
        qkv = tuple(torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen)
        for fn in kernels.values():  # warm-up
            _median_ms(fn, qkv, grad, 2)
        per = {name: [] for name in kernels}
        for _ in range(args.rounds):
            for name, fn in kernels.items():
                per[name].append(_median_ms(fn, qkv, grad, args.repeats))
        row = {"keys": n, **{name: statistics.median(ts) for name, ts in per.items()}}
        rows.append(row)
        print(
            f"{n} | {row['sdpa']:.1f} | {row['explicit']:.1f} | {row['sdpa'] / row['explicit']:.2f}"
        )
    print(f"end:   {_uptime()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
