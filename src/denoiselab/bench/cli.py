"""``denoiselab bench``: argument parsing for :func:`run_bench` (wired by ``denoiselab.cli``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from denoiselab.bench.breakdown import breakdown_table
from denoiselab.bench.runner import BenchConfig, choose_dtype, prepare, run_bench
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
    p.add_argument(
        "--sample-batch", type=int, default=d.sample_batch, help=f"({d.sample_batch}; 0: --batch)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default=d.dtype,
        help="auto (default): bf16 where the hardware has native bf16 (CUDA ≥ 8.0, a CPU "
        "with AMX or AVX512-BF16), else fp32",
    )
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
    p.add_argument(
        "--repa",
        nargs="+",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="also time training with a loss term (teacher forward included) against the "
        "step without terms, e.g. repa, irepa, repa:block=2,teacher.kind=dinov2,teacher.path=DIR",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the training step phase by phase (data, forward, loss, backward, "
        "optimizer, EMA, bookkeeping) against a bare forward+backward+optimizer step",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training-config override, e.g. model.depth=4 (repeatable)",
    )
    p.add_argument(
        "--routing",
        nargs="+",
        default=[],
        metavar="KIND:RATIO[:START:END]",
        help="time token-routing variants against the dense step, e.g. tread:0.5 "
        "sprint:0.75:1:2 (START/END: routed blocks, both included)",
    )
    p.add_argument(
        "--optim",
        nargs="+",
        default=[],
        metavar="NAME[:NS_DTYPE]",
        help="time optimizer variants against AdamW: muon, muon:bf16, muon:fp32",
    )
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
    p.add_argument("--out", default="runs/bench", help="output folder for bench.json (runs/bench)")
    return p


def bench_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the benchmark, print the one-line summary last. Returns 0, or 2 on
    a bad argument (message on stderr)."""
    args = build_parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k != "out"}
    fields["interval"] = tuple(fields["interval"])
    fields["sample_batch"] = fields["sample_batch"] or None  # 0: the training batch
    for key in ("repa", "sets", "routing", "optim"):
        fields[key] = tuple(fields[key])
    try:
        cfg = BenchConfig(**fields)
        prepare(cfg)  # names a bad model, size or device before anything runs
        _, reason = choose_dtype(cfg)
    except ValueError as e:
        print(f"denoiselab bench: error: {str(e).removeprefix('bench: ')}", file=sys.stderr)
        return 2
    print(f"dtype {reason}", file=sys.stderr, flush=True)
    result = run_bench(cfg, args.out)
    print(f"wrote {args.out}/bench.json", file=sys.stderr)
    if "breakdown" in result.get("train", {}):
        print("\n".join(breakdown_table(result["train"]["breakdown"])), flush=True)
    print(result["summary"], flush=True)
    return 0
