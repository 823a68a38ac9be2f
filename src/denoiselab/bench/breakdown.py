"""``denoiselab bench --breakdown``: where the training step's time goes, without a profiler.

The real ``Trainer.train_step`` runs with a :class:`~denoiselab.train.stepclock.PhaseClock`
installed (laps between data transfer, forward, loss, backward, optimizer, EMA and
bookkeeping; on CUDA, events read after one synchronisation per step). Alternating with it,
a *bare* step runs as a floor: the same network (compiled if the run is) on the same batch,
forward + a plain mean-square loss on its raw output + backward + the same optimizer step,
nothing else. ``step − bare`` is what the objective, seeding, EMA and bookkeeping cost.

The normal timing of ``bench`` is done before and without any of this.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from denoiselab.bench.timing import time_once
from denoiselab.bench.workloads import TrainWorkload
from denoiselab.train.stepclock import PHASES, PhaseClock, TimedNet


class BareStep:
    """Forward + ``mean((net(z, t, y) − x)²)`` + backward + optimizer step and zero_grad, on
    ``work``'s batch with the trainer's own network and optimizer (and autocast)."""

    def __init__(self, work: TrainWorkload) -> None:
        trainer = work.trainer
        self.net = trainer.module.net
        self.optimizer, self.autocast = trainer.optimizer, trainer.autocast
        gen = torch.Generator().manual_seed(1)
        x = work.images
        t = torch.rand(x.shape[0], generator=gen).to(x.device)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        tb = t.view(-1, *([1] * (x.dim() - 1)))
        self.x, self.t, self.y = x, t, work.labels
        self.z = tb * x + (1 - tb) * eps

    def __call__(self) -> None:
        with self.autocast():
            out = self.net(self.z, self.t, self.y)
        loss = (out.float() - self.x).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure_breakdown(work: TrainWorkload, repeats: int) -> dict[str, Any]:
    """``repeats`` timed-by-phase training steps alternating with ``repeats`` bare steps."""
    trainer = work.trainer
    device = trainer.device
    clock = PhaseClock(device)
    bare = BareStep(work)
    net = trainer.module.net
    steps: list[dict[str, float]] = []
    bare_s: list[float] = []
    old_clock = trainer.step_clock
    trainer.step_clock = clock
    trainer.module.__dict__["net"] = TimedNet(net, clock)
    try:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            clock.start()
            work()
            steps.append(clock.stop())
            bare_s.append(time_once(bare, device))
    finally:
        trainer.module.__dict__["net"] = net
        trainer.step_clock = old_clock
    return summarise(steps, bare_s, "cuda events" if clock.cuda else "perf_counter")


def summarise(steps: list[dict[str, float]], bare_s: list[float], clock: str) -> dict[str, Any]:
    """Medians (ms) per phase, of the whole step (the sum of its phases) and of the bare
    step; each phase's share of the median step; ``overhead_ms`` = step − bare."""
    totals = [sum(s.values()) for s in steps]
    step_ms = 1e3 * statistics.median(totals)
    phases = {p: 1e3 * statistics.median(s[p] for s in steps) for p in PHASES}
    bare_ms = 1e3 * statistics.median(bare_s)
    return {
        "clock": clock,
        "repeats": len(steps),
        "step_ms": step_ms,
        "phases_ms": phases,
        "phase_share": {p: ms / step_ms for p, ms in phases.items()},
        "bare_step_ms": bare_ms,
        "bare_share": bare_ms / step_ms,
        "overhead_ms": step_ms - bare_ms,
        "steps_s": totals,
        "bare_steps_s": bare_s,
    }


def breakdown_table(b: dict[str, Any]) -> list[str]:
    """The breakdown as aligned text lines (printed by ``denoiselab bench --breakdown``)."""
    lines = [f"train step breakdown (median of {b['repeats']}, {b['clock']}):"]
    for p in PHASES:
        lines.append(f"  {p:<12} {b['phases_ms'][p]:9.2f} ms  {100 * b['phase_share'][p]:5.1f} %")
    lines.append(f"  {'step':<12} {b['step_ms']:9.2f} ms  100.0 %")
    lines.append(
        f"  {'bare step':<12} {b['bare_step_ms']:9.2f} ms  {100 * b['bare_share']:5.1f} %"
        f"  (network fwd + bwd + optimizer only; overhead {b['overhead_ms']:.2f} ms)"
    )
    return lines
