"""``denoiselab bench --repa SPEC``: train img/s with and without a loss term, in one run.

A SPEC is a term of :data:`denoiselab.algorithms.TERMS` and optional fields,
``NAME[:key=value,key=value]`` (``repa``, ``irepa``, ``repa:block=2,teacher.kind=dinov2,
teacher.path=DIR``). Each SPEC is the benchmark's training config plus that term; the
teacher's forward and the projector are part of the timed step. The base (no term) and every
SPEC are built first, warmed up, then timed round-robin (each repeat times one step of each),
so that a load change on a shared machine hits them alike; the cost of a term is the median
over repeats of ``t_term / t_base`` (paired).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch

from denoiselab.algorithms import parse_terms
from denoiselab.bench.variants import round_robin
from denoiselab.config import ConfigError, apply_overrides
from denoiselab.train.config import TrainConfig


def parse_term_spec(spec: str) -> dict[str, Any]:
    """``NAME[:k=v,k=v]`` → ``{NAME: {fields}}``, validated (ValueError naming the spec)."""
    name, _, rest = spec.partition(":")
    overrides = [f"{name}.{kv}" for kv in rest.split(",") if kv]
    try:
        terms = apply_overrides({name: {}}, overrides)
        parse_terms(terms)
    except ConfigError as e:
        raise ValueError(f"bench: --repa {spec!r}: {e}") from None
    return terms


def bench_terms(tc: TrainConfig, specs: list[str], warmup: int, repeats: int) -> dict[str, Any]:
    """Time ``tc`` without terms (the base) and with each SPEC's term, round-robin."""
    configs = [dataclasses.replace(tc, terms={})]
    configs += [dataclasses.replace(tc, terms=parse_terms(parse_term_spec(s))) for s in specs]
    times, trainers, _ = round_robin(configs, warmup, repeats)
    extra = [sum(p.numel() for p in trainer.objective.parameters()) for trainer in trainers]
    rows = []
    for i, (name, t) in enumerate(zip(["without terms", *specs], times)):
        row = {
            "variant": name,
            "images_per_s": tc.global_batch / statistics.median(t),
            "step_s_median": statistics.median(t),
            "steps_s": t,
            "term_params": extra[i],
        }
        if i:
            row["cost"] = statistics.median(v / b for b, v in zip(times[0], t))
        rows.append(row)
    return {
        "timing": "round-robin: each repeat times one step without terms and one per SPEC",
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def summary_part(result: dict[str, Any]) -> str:
    """``train img/s without terms 812 | repa 640 (1.27× the step time)``."""
    base, *rows = result["rows"]
    cells = [f"{r['variant']} {r['images_per_s']:.1f} ({r['cost']:.2f}× step time)" for r in rows]
    return f"train img/s without terms {base['images_per_s']:.1f}, " + ", ".join(cells)
