"""``denoiselab bench``: argument parsing for :func:`run_bench` (wired by ``denoiselab.cli``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from denoiselab.bench.runner import BenchConfig, prepare, run_bench
from denoiselab.cliutil import ArgumentParser


def build_parser(prog: str = "denoiselab bench") -> argparse.ArgumentParser:
    d = BenchConfig()
    p = ArgumentParser(
        prog=prog,
        description="Measure training and sampling throughput, peak memory and model FLOP "
        "utilisation against this machine's measured matmul rate; writes OUT/bench.json.",
    )
    p.add_argument("--model", default=d.model, help=f"preset name (default {d.model})")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch", type=int, default=d.batch, help=f"training batch ({d.batch})")
    p.add_argument("--sample-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=d.dtype)
    p.add_argument("--compile", action="store_true", help="torch.compile training and sampling")
    p.add_argument(
        "--what",
        choices=("train", "sample", "all", "data"),
        default=d.what,
        help="data: only the input pipeline of --data",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed training steps")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed training steps")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="Heun steps")
    p.add_argument("--sample-repeats", type=int, default=d.sample_repeats, help="timed runs")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="guidance scale ω")
    p.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=d.interval,
        metavar=("LO", "HI"),
        help="CFG interval (default 0.1 1.0)",
    )
    p.add_argument("--matmul-max-size", type=int, default=None, help="cap on the ceiling's n")
    p.add_argument("--profile", action="store_true", help="write profile_{train,sample}.txt")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default=d.strategy)
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks")
    p.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        default=d.compile_mode,
    )
    p.add_argument(
        "--data",
        help="an image folder or prepared folder: time its loader alone and the training step "
        "fed by it, and name the bottleneck",
    )
    p.add_argument("--data-batches", type=int, default=d.data_batches, help="timed batches")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: auto)")
    p.add_argument("--out", required=True, help="output folder for bench.json")
    return p


def bench_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the benchmark, print the one-line summary last. Returns 0, or 2 on
    a bad argument (message on stderr)."""
    args = build_parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k != "out"}
    fields["interval"] = tuple(fields["interval"])
    try:
        cfg = BenchConfig(**fields)
        prepare(cfg)  # names a bad model, size or device before anything runs
    except ValueError as e:
        print(f"denoiselab bench: error: {str(e).removeprefix('bench: ')}", file=sys.stderr)
        return 2
    result = run_bench(cfg, args.out)
    print(f"wrote {args.out}/bench.json", file=sys.stderr)
    print(result["summary"], flush=True)
    return 0
