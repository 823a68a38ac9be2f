#!/usr/bin/env python
"""Forward + backward (training) and forward alone under ``no_grad`` (sampling) of one
attention: SDPA (on the CPU, its flash kernel) against the explicit product
``softmax(q·kᵀ/√d)·v`` of ``models.fused.attention``, by number of keys.

This is the measurement behind ``models.fused.SHORT_KEYS``: below it the explicit product
is used on the CPU in float32. Shapes default to JiT-T/4 at batch 64 (3 heads of 64).
Each size alternates the two kernels ``--rounds`` times (median of ``--repeats`` calls each
time) and reports the median over rounds; the JSON records ``uptime`` before and after,
the source revision and the machine.

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

from denoiselab.bench.machine import machine_facts
from denoiselab.models import fused
from denoiselab.train.run import git_revision


def _median_ms(fn, args: tuple, grad: torch.Tensor | None, repeats: int) -> float:
    """Median ms of ``fn(*args).backward(grad)``, or of ``fn(*args)`` under ``no_grad`` when
    ``grad`` is None."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if grad is None:
            with torch.no_grad():
                fn(*args)
        else:
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
    start = _uptime()
    print(f"start: {start}")
    print(f"SHORT_KEYS = {fused.SHORT_KEYS}; torch {torch.__version__}, {args.threads} threads")
    print("keys | fwd+bwd: SDPA ms | explicit ms | ratio | fwd only: SDPA ms | explicit ms | ratio")
    rows = []
    for n in args.keys:
        gen = torch.Generator().manual_seed(n)
        shape = (args.batch, args.heads, n, args.head_dim)
        qkv = tuple(torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen)
        per: dict[str, list[float]] = {}
        for mode, g in (("", grad), ("forward_", None)):
            for fn in kernels.values():  # warm-up
                _median_ms(fn, qkv, g, 2)
            for _ in range(args.rounds):
                for name, fn in kernels.items():
                    per.setdefault(mode + name, []).append(_median_ms(fn, qkv, g, args.repeats))
        row = {"keys": n, **{name: statistics.median(ts) for name, ts in per.items()}}
        rows.append(row)
        print(
            f"{n} | {row['sdpa']:.1f} | {row['explicit']:.1f} | {row['sdpa'] / row['explicit']:.2f}"
            f" | {row['forward_sdpa']:.2f} | {row['forward_explicit']:.2f}"
            f" | {row['forward_sdpa'] / row['forward_explicit']:.2f}"
        )
    end = _uptime()
    print(f"end:   {end}")
    if args.out:
        record = {"args": vars(args), "rows": rows, "uptime_start": start, "uptime_end": end,
                  "revision": git_revision(), "machine": machine_facts(torch.device("cpu"))}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
