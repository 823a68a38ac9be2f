#!/usr/bin/env python
"""CPU time of ``Trainer.train_step`` (the ``denoiselab bench`` workload) on one thread.

On a machine shared with other jobs, wall-clock time measures the waiting as much as the
work; the stepping thread's CPU time (``time.thread_time``, one intra-op thread so that all
the work is on it) measures the work. Use it to compare two versions of the code: run it
alternately with ``PYTHONPATH`` pointing at each tree, e.g. before/after issue #21:

    mkdir -p /tmp/before && git archive 870b72a src | tar -x -C /tmp/before
    for i in 1 2 3; do
      PYTHONPATH=/tmp/before/src python benchmarks/step_cpu_time.py --tag before
      PYTHONPATH=src python benchmarks/step_cpu_time.py --tag after
    done

Prints one line: tag, setting, min and median step CPU time (ms) and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from denoiselab.bench.workloads import TrainWorkload, bench_train_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="JiT-T/4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = bench_train_config(args.model, None, args.batch, "fp32", args.compile, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = TrainWorkload.build(cfg, Path(tmp))
        with torch.no_grad():  # leave the zero init (adaLN-Zero), as the bench's sampler does
            gen = torch.Generator().manual_seed(0)
            for param in work.trainer.model.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
        for _ in range(args.warmup):
            work()
        times = []
        for _ in range(args.steps):
            start = time.thread_time()
            work()
            times.append(1e3 * (time.thread_time() - start))
    mode = "compile" if args.compile else "eager"
    print(
        f"{args.tag} {args.model} b{args.batch} {mode} 1 thread: step CPU time "
        f"min {min(times):.1f} ms, median {statistics.median(times):.1f} ms "
        f"| load {[round(x, 2) for x in os.getloadavg()]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
