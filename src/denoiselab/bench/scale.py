"""The scale table: training throughput, MFU, peak memory and the largest batch that fits,
per model and strategy, on one device, in one process (``benchmarks/gpu_suite.sh``).

``python -m denoiselab.bench.scale --out DIR`` measures each row (model @ resolution ×
strategy) with the real ``Trainer.train_step``: a compiled warm-up, timed steps at the row's
batch (median), CUDA's allocator peak, then a doubling search for the largest batch whose
step runs (eager: ``torch.compiler.set_stance("force_eager")`` spares a recompilation per
size; compiled steps usually need less memory, so this is a lower bound). Rows run in the
given order until ``--budget-s`` is spent; the rest are listed as not measured. One matmul
ceiling per process (bf16 or fp32), as ``denoiselab bench``. Writes ``scale.json`` and
``scale.md`` (a table BENCHMARKS.md takes verbatim) and prints the table.

Compilation is per block ("regional": every block shares one compiled graph, so the
cold start is one block's, not the network's); FSDP compiles per block anyway.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from denoiselab.bench.ceiling import matmul_ceiling
from denoiselab.bench.machine import load_average, machine_facts
from denoiselab.bench.timing import measure, peak_memory, reset_peak_memory, time_once
from denoiselab.bench.workloads import TrainWorkload, bench_train_config
from denoiselab.models import forward_macs

# model@size:batch, in the order they are measured (the headline model first)
DEFAULT_ROWS = ("JiT-B/16@256:128", "JiT-L/16@256:128", "JiT-B/32@512:128", "JiT-H/16@256:64",
                "JiT-G/16@256:32")  # fmt: skip
STRATEGIES = {"ddp": ("ddp", False), "fsdp+ac": ("fsdp", True), "ddp+ac": ("ddp", True),
              "fsdp": ("fsdp", False)}  # fmt: skip


@dataclass(frozen=True)
class Row:
    model: str
    size: int
    batch: int
    strategy: str

    @classmethod
    def parse(cls, spec: str, strategy: str) -> Row:
        """``"JiT-B/16@256:128"`` → model, image size, batch."""
        try:
            model, rest = spec.split("@")
            size, batch = rest.split(":")
            return cls(model, int(size), int(batch), strategy)
        except ValueError:
            raise ValueError(
                f"row {spec!r}: expected MODEL@SIZE:BATCH, e.g. JiT-B/16@256:128"
            ) from None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(
    step: Callable[[int], None], start: int, cap: int, deadline: float
) -> tuple[int | None, int | None, str]:
    """Double the batch from ``start`` while ``step(batch)`` runs, up to ``cap`` or the
    ``deadline``. Returns ``(largest that ran, first that ran out of memory, note)``."""
    good, bad, batch = None, None, start
    while batch <= cap:
        if time.monotonic() > deadline:
            return good, bad, "time budget"
        try:
            step(batch)
            good = batch
        except Exception as e:  # a CUDA OOM, or what FSDP makes of it
            if not _is_oom(e):
                raise
            return good, batch, "out of memory"
        batch *= 2
    return good, bad, f"cap {cap}"


def measure_row(row: Row, args: argparse.Namespace, ceiling: float, deadline: float) -> dict:
    """One row: timed steps at ``row.batch``, peak memory, the largest batch."""
    device_name = args.device
    strategy, ac = STRATEGIES[row.strategy]
    tc = bench_train_config(
        row.model, row.size, row.batch, args.dtype, False, device_name,
        strategy=strategy, activation_checkpointing=ac,
    )  # fmt: skip
    out: dict[str, Any] = {"model": row.model, "size": row.size, "batch": row.batch,
                           "strategy": row.strategy}  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        tic = time.monotonic()
        work = TrainWorkload.build(tc, Path(run_dir))
        trainer, device = work.trainer, work.trainer.device
        try:
            out["build_s"] = time.monotonic() - tic
            if args.compile:  # regional: each block in place (names, hooks unchanged)
                for block in trainer.model.blocks:
                    block.compile()
            mc = trainer.model_cfg
            gflops = forward_macs(mc)["gflops"]
            reset_peak_memory(device)
            timings = measure(work, device, warmup=args.warmup, repeats=args.repeats)
            rate = row.batch / timings.median_s
            out.update(
                images_per_s=rate,
                mfu=rate * 3 * gflops / ceiling,
                warmup_s=timings.warmup_s,
                step_s=timings.median_s,
                peak_gib=peak_memory(device)["peak_memory_mib"] / 1024,
            )
            with torch.compiler.set_stance("force_eager"):
                good, bad, why = largest_batch(
                    lambda batch: _one_step(trainer, batch, out), row.batch, args.max_batch,
                    deadline,
                )  # fmt: skip
            out.update(largest_batch=good, first_oom=bad, search_end=why)
        finally:
            trainer.close()
    _free(device)
    return out


def _one_step(trainer: Any, batch: int, out: dict[str, Any]) -> None:
    """One training step at ``batch`` on random data; its peak memory into ``out``."""
    mc, device = trainer.model_cfg, trainer.device
    g = torch.Generator().manual_seed(batch)
    shape = (batch, mc.in_channels, mc.image_size, mc.image_size)
    batch_xy = [
        (torch.rand(shape, generator=g) * 2 - 1).to(device),
        torch.randint(0, mc.num_classes, (batch,), generator=g).to(device),
    ]
    reset_peak_memory(device)
    try:
        time_once(lambda: trainer.train_step(0, *batch_xy), device)
        out["peak_gib_largest"] = peak_memory(device)["peak_memory_mib"] / 1024
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        batch_xy.clear()  # the batch's memory is free for the next, larger one
        _free(device)


def _fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['size']} | {r['strategy']} | {r['batch']} | {r['error']} |||||"
    largest = r.get("largest_batch")
    note = {"out of memory": f"OOM at {r.get('first_oom')}", "time budget": "budget"}.get(
        r.get("search_end", ""), r.get("search_end", "")
    )
    peak_l = r.get("peak_gib_largest")
    return (
        f"| {r['model']} | {r['size']} | {r['strategy']} | {r['batch']} | "
        f"{r['images_per_s']:.0f} | {100 * r['mfu']:.1f} % | {r['peak_gib']:.1f} | "
        f"{largest if largest is not None else '—'} ({note}) | "
        f"{f'{peak_l:.1f}' if peak_l is not None else '—'} | {r['warmup_s']:.0f} |"
    )


def table(results: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    gpu = facts.get("gpu", {}).get("name", facts["device"])
    head = (
        f"{gpu}, torch {facts['torch']}, {facts['date']}, {facts['dtype']}, compiled per block: "
        f"{facts['compile']}; MFU against the measured {facts['ceiling_tflops']:.3g} TFLOP/s "
        f"matmul ceiling; load {facts['load_average']} → {facts['load_average_end']}\n\n"
        "| model | px | strategy | batch | train img/s | MFU | peak GiB | largest batch "
        "(eager doubling) | peak GiB there | warm-up s |\n"
        "| :-- | --: | :-- | --: | --: | --: | --: | :-- | --: | --: |"
    )
    return "\n".join([head, *map(_fmt, results)]) + "\n"


def scale_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m denoiselab.bench.scale", description=__doc__)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="MODEL@SIZE:BATCH,...")
    p.add_argument("--strategies", default="ddp,fsdp+ac", help=", ".join(STRATEGIES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--matmul-max-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tic = time.monotonic()
    deadline = tic + args.budget_s
    strategies = args.strategies.split(",")
    rows = [Row.parse(spec, s) for spec in args.rows.split(",") for s in strategies]
    from denoiselab.train.distributed import resolve_device

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ceiling = matmul_ceiling(device, dtype, max_size=args.matmul_max_size)["gflops_per_s"]
    facts = machine_facts(device)
    facts.update(dtype=args.dtype, compile=args.compile, ceiling_tflops=ceiling / 1000)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows:
        base = {"model": row.model, "size": row.size, "batch": row.batch, "strategy": row.strategy}
        if time.monotonic() > deadline:
            results.append({**base, "error": "not measured (time budget)"})
            continue
        try:
            results.append(measure_row(row, args, ceiling, deadline))
        except Exception as e:  # one row's failure (an OOM at its own batch) is a table cell
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            what = "OOM at its batch" if _is_oom(e) else f"failed: {first[:120]}"
            results.append({**base, "error": what})
            _free(device)
        print(f"[{time.monotonic() - tic:.0f}s] {results[-1]}", flush=True)
    facts["load_average_end"] = load_average()
    md = table(results, facts)
    (out_dir / "scale.json").write_text(json.dumps({"facts": facts, "rows": results}, indent=1))
    (out_dir / "scale.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(scale_main())
