"""Equal wall-clock budgets: each variant trains for the images that the baseline's training
time buys at the variant's own measured speed.

With ``budget: time`` (suite key or ``denoiselab ablate --budget time``) the runner first times
a few training steps of every variant, round-robin on the suite's device (``Trainer.train_step``:
forward, backward, optimizer, EMA — what routing and the optimizer change), and sets

    duration_nimg(v) = round(D · s_v / B) · B,    s_v = median_r( t_base,r / t_v,r )

where D is the suite's ``duration_nimg``, B the global batch and t the paired step times of
the baseline and of v. The measurement is written to ``OUT/throughput.json`` and reused on
every later session, so a resumed or parallel run keeps the same durations (and a variant's
fingerprint, which holds its duration, does not change); variants it lacks (an earlier
``--only`` run timed others) are timed against the baseline when first run and added. Edit or
write that file before a run to pin the speeds. Evaluation and data loading are outside the measurement: equal wall-clock
means equal training-step time.

The measurement runs with the run's own threads and priority. On a machine shared with other
jobs that is scheduling noise more than model cost (measured 2026-12-01: 2 threads at nice 15
under load 7 gave TREAD 2.0× where one thread at nice 10 gave 1.29×, as ``denoiselab bench``
did): there, measure once under better conditions (``measure_speeds``) and write the file.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from denoiselab.ablate.files import read_json, write_json
from denoiselab.ablate.suite import Suite
from denoiselab.bench.machine import load_average
from denoiselab.config import ConfigError

MEASURE = {"warmup": 3, "repeats": 20}
MEASURE_QUICK = {"warmup": 1, "repeats": 3}
Log = Callable[[str], None]


def measure_speeds(
    suite: Suite,
    device: str | None,
    warmup: int,
    repeats: int,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Speed of each variant in ``names`` (default all) relative to the baseline (paired,
    round-robin step times; the baseline is always timed)."""
    from denoiselab.bench.variants import paired_speedup, round_robin

    chosen = suite.names if names is None else names
    names = [suite.baseline, *(n for n in chosen if n != suite.baseline)]
    dev = None if device in (None, "auto") else device
    load = load_average()
    times, _, _ = round_robin([suite.config(n, device=dev) for n in names], warmup, repeats)
    batch = suite.config(suite.baseline).global_batch
    return {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device or "auto",
        "threads": torch.get_num_threads(),
        "load_average": [load, load_average()],
        "warmup": warmup,
        "repeats": repeats,
        "step_s": dict(zip(names, times)),
        "img_per_s": {n: batch * len(t) / sum(t) for n, t in zip(names, times)},
        "speed": {n: paired_speedup(times[0], t) for n, t in zip(names, times)},
    }


def durations_for(
    suite: Suite, speed: dict[str, float], names: list[str] | None = None
) -> dict[str, int]:
    """``duration_nimg`` of the baseline and each variant in ``names`` (default all) for the
    baseline's budget at relative ``speed``."""
    base = suite.config(suite.baseline)
    batch, budget = base.global_batch, base.duration_nimg
    wanted = [suite.baseline, *(n for n in (suite.names if names is None else names))]
    wanted = list(dict.fromkeys(wanted))
    missing = [n for n in wanted if n not in speed]
    if missing:
        raise ConfigError(f"throughput.json has no speed for variant(s) {missing}; delete it to re-measure")  # fmt: skip
    return {n: max(1, round(budget * speed[n] / batch)) * batch for n in wanted}


def _merge(record: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the variants of a later measurement ``new`` added (each speed is
    relative to the baseline timed in its own session; speeds already recorded are kept, so
    durations of variants that already ran do not change). The later session is listed under
    ``added`` with its time and load."""
    out = dict(record)
    added = [n for n in new["speed"] if n not in record["speed"]]
    for key in ("speed", "step_s", "img_per_s"):
        out[key] = {
            **record.get(key, {}),
            **{n: new[key][n] for n in added if n in new.get(key, {})},
        }
    session = {k: new.get(k) for k in ("measured", "device", "threads", "load_average")}
    out["added"] = [*record.get("added", []), {**session, "variants": added}]
    return out


def apply_time_budget(
    suite: Suite, out: Path, device: str | None, log: Log = print, names: list[str] | None = None
) -> Suite:
    """The suite with durations for equal wall-clock (module docstring) for the baseline and
    the variants in ``names`` (default all: ``--only`` times only what it runs, so a variant
    that cannot be built here — LPIPS without its weights — does not stop the others): speeds
    from ``out/throughput.json`` if it exists (variants it lacks are timed now against the
    baseline and added), else measured now and written there."""
    path = Path(out) / "throughput.json"
    settings = MEASURE_QUICK if suite.quick else MEASURE
    if path.is_file():
        record = read_json(path)
        log(f"equal wall-clock: speeds from {path}")
        wanted = suite.names if names is None else names
        missing = [n for n in wanted if n != suite.baseline and n not in record["speed"]]
        if missing:  # an earlier --only run timed others: time these against the baseline
            log(f"equal wall-clock: timing {settings['repeats']} training steps of {missing}")
            record = _merge(record, measure_speeds(suite, device, **settings, names=missing))
            write_json(path, record)
    else:
        log(f"equal wall-clock: timing {settings['repeats']} training steps of each variant")
        record = measure_speeds(suite, device, **settings, names=names)
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(path, record)
    # every variant with a recorded speed (not only this run's), so suite.json keeps them all
    durations = durations_for(
        suite, record["speed"], [n for n in suite.names if n in record["speed"]]
    )
    shown = ", ".join(f"{n} ×{record['speed'][n]:.2f} → {d:,} images" for n, d in durations.items())
    log(f"equal wall-clock budget: {shown}")
    return dataclasses.replace(suite, durations=durations)
