"""Training-step variants timed against the benchmark's own dense AdamW step, in one run.

A variant is the benchmark's training config with a few changes: token routing
(``--routing tread:0.5``) or another optimizer (``--optim muon:fp32``). All workloads are
built first, warmed up, then timed round-robin — repeat r times the base and every variant
one step each — so that a load change on a shared machine hits them alike. The speed-up of a
variant is the median over repeats of ``t_base / t_variant`` (paired, robust to drift).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from denoiselab.bench.timing import time_once
from denoiselab.bench.workloads import TrainWorkload, resolved_model_config
from denoiselab.config import from_dict
from denoiselab.models import forward_macs
from denoiselab.models.routing import RoutingConfig
from denoiselab.train.config import OptimConfig, TrainConfig


@dataclass(frozen=True)
class TrainVariant:
    """``name`` (the spec as given) and what it changes: ``model.routing`` fields, or
    ``optim`` fields (``name`` and ``muon`` settings)."""

    name: str
    routing: dict[str, Any] | None = None
    optim: dict[str, Any] | None = None


def parse_routing(spec: str) -> TrainVariant:
    """``KIND:RATIO[:START:END]`` → a routing variant (``tread:0.5``, ``sprint:0.75:1:2``);
    START/END default to ``RoutingConfig``'s (PRX's blocks 2 … depth − 4)."""
    parts = spec.split(":")
    if len(parts) not in (2, 4) or parts[0] not in ("tread", "sprint"):
        raise ValueError(
            f"bench: --routing {spec!r}; expected KIND:RATIO[:START:END] with KIND tread or "
            "sprint, e.g. tread:0.5 or sprint:0.75:1:2"
        )
    try:
        fields: dict[str, Any] = {"kind": parts[0], "ratio": float(parts[1])}
        if len(parts) == 4:
            fields.update(start=int(parts[2]), end=int(parts[3]))
    except ValueError:
        raise ValueError(
            f"bench: --routing {spec!r}: RATIO is a number, START/END integers"
        ) from None
    RoutingConfig(**fields)  # names a bad kind or ratio now
    return TrainVariant(spec, routing=fields)


def parse_optim(spec: str) -> TrainVariant:
    """``adamw``, ``muon`` or ``muon:DTYPE`` (DTYPE auto, bf16 or fp32: the Newton–Schulz dtype)."""
    name, _, dtype = spec.partition(":")
    if name not in ("adamw", "muon") or (dtype and (name != "muon" or dtype not in ("auto", "bf16", "fp32"))):  # fmt: skip
        raise ValueError(
            f"bench: --optim {spec!r}; valid: adamw, muon, muon:auto, muon:bf16, muon:fp32"
        )
    optim: dict[str, Any] = {"name": name}
    if dtype:
        optim["muon"] = {"ns_dtype": dtype}
    return TrainVariant(spec, optim=optim)


def variant_config(tc: TrainConfig, v: TrainVariant) -> TrainConfig:
    """The base config ``tc`` with ``v``'s changes, validated (a bad range is a ValueError)."""
    model = dict(tc.model)
    if v.routing is not None:
        model["routing"] = v.routing
    optim = tc.optim
    if v.optim is not None:
        optim = from_dict(OptimConfig, {**dataclasses.asdict(tc.optim), **v.optim}, "optim")
    cfg = dataclasses.replace(tc, model=model, optim=optim)
    resolved_model_config(cfg)  # the routing range against the depth
    return cfg


def round_robin(
    configs: list[TrainConfig], warmup: int, repeats: int
) -> tuple[list[list[float]], list[Any], list[int]]:
    """Seconds of ``repeats`` training steps of each config, timed round-robin after
    ``warmup`` untimed steps each; also each run's trainer (closed) and steps taken."""
    with tempfile.TemporaryDirectory() as root:
        works = [TrainWorkload.build(c, Path(root) / str(i)) for i, c in enumerate(configs)]
        try:
            device = works[0].trainer.device
            for work in works:
                for _ in range(warmup):
                    work()
            times: list[list[float]] = [[] for _ in works]
            for _ in range(repeats):
                for t, work in zip(times, works):
                    t.append(time_once(work, device))
        finally:
            for work in works:
                work.trainer.close()
        return times, [w.trainer for w in works], [w.step for w in works]


def paired_speedup(base: list[float], other: list[float]) -> float:
    """Median over repeats of ``base_r / other_r``: > 1 when ``other`` steps faster."""
    return statistics.median(b / o for b, o in zip(base, other))


def bench_variants(
    tc: TrainConfig, variants: list[TrainVariant], warmup: int, repeats: int
) -> dict[str, Any]:
    """Time ``tc`` (dense, AdamW: the base) and each variant round-robin; see the module doc."""
    configs = [tc, *(variant_config(tc, v) for v in variants)]
    times, trainers, steps_run = round_robin(configs, warmup, repeats)
    models = [trainer.model_cfg for trainer in trainers]
    base_flops = 3 * forward_macs(models[0], routed=True)["gflops"]
    rows = []
    for i, (name, t, mc) in enumerate(zip(["base", *(v.name for v in variants)], times, models)):
        flops = 3 * forward_macs(mc, routed=True)["gflops"]
        row = {
            "variant": name,
            "images_per_s": tc.global_batch / statistics.median(t),
            "step_s_median": statistics.median(t),
            "steps_s": t,
            "steps_run": steps_run[i],  # warm-up + timed steps of this variant's own trainer
            "train_gflops_per_image": flops,
            "flop_ratio": flops / base_flops,
        }
        if i:
            row["speedup"] = paired_speedup(times[0], t)
        rows.append(row)
    return {
        "base": "dense network, AdamW (the benchmark's training config)",
        "timing": "round-robin: each repeat times one step of the base and of every variant",
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def summary_part(compare: dict[str, Any]) -> str:
    """``vs base: tread:0.5 1.31× (flops 0.64×), muon 0.71×``."""
    cells = []
    for row in compare["rows"][1:]:
        flops = f" (flops {row['flop_ratio']:.2f}×)" if row["flop_ratio"] != 1 else ""
        cells.append(f"{row['variant']} {row['speedup']:.2f}×{flops}")
    return "step speed-up vs dense AdamW: " + ", ".join(cells)
