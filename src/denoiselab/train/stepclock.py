"""Where a training step's time goes: laps between the phases of ``Trainer.train_step``.

``train_step`` calls ``clock.lap(phase)`` when a phase ends; the time since the previous lap
is charged to that phase. The trainer's default clock is :data:`NO_CLOCK`, whose ``lap``
does nothing (no timing, no synchronisation). ``denoiselab bench --breakdown`` installs a
:class:`PhaseClock` instead.

Phases (``PHASES``): ``data`` (batch to device), ``forward`` (the network's forward),
``loss`` (noise and time draws, interpolation, conversions, per-term means),
``backward``, ``optimizer`` (clipping, step, zero_grad), ``ema`` and ``bookkeeping``
(learning rate, seeding, running totals, anything else inside the step).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

PHASES = ("data", "forward", "loss", "backward", "optimizer", "ema", "bookkeeping")


class StepClock(Protocol):
    def lap(self, phase: str) -> None: ...


class _NoClock:
    """The default: laps cost one no-op method call."""

    __slots__ = ()

    def lap(self, phase: str) -> None:
        pass


NO_CLOCK: StepClock = _NoClock()


class PhaseClock:
    """Times laps with ``clock`` (CPU: ``time.perf_counter``; tests pass a fake one) or, on
    CUDA, with events recorded on the current stream and read after one synchronisation in
    :meth:`stop`, so the timed work itself never waits for the GPU.

    ``start()``, then laps, then ``stop() -> {phase: seconds}``: the phases sum to the time
    from ``start`` to ``stop`` exactly (the tail after the last lap is ``bookkeeping``).
    """

    def __init__(
        self, device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.clock = clock
        self._marks: list[tuple[str, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def start(self) -> None:
        self._marks = [("", self._now())]

    def lap(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown step phase {phase!r}; valid: {', '.join(PHASES)}")
        self._marks.append((phase, self._now()))

    def stop(self) -> dict[str, float]:
        """Seconds per phase since :meth:`start` (every phase present, unused ones 0)."""
        if not self._marks:
            raise RuntimeError("PhaseClock.stop() without start()")
        self._marks.append(("bookkeeping", self._now()))
        if self.cuda:
            self._marks[-1][1].synchronize()
        out = dict.fromkeys(PHASES, 0.0)
        for (_, before), (phase, after) in zip(self._marks, self._marks[1:]):
            out[phase] += self._elapsed(before, after)
        self._marks = []
        return out

    def _elapsed(self, before: Any, after: Any) -> float:
        if self.cuda:
            return before.elapsed_time(after) / 1000.0
        return after - before


class TimedNet:
    """Wraps the network an objective calls so that its forward is its own phase: the time
    before the call is charged to ``loss`` and the call itself to ``forward``."""

    def __init__(self, net: Callable[..., Any], clock: StepClock) -> None:
        self.net, self.clock = net, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.lap("loss")
        out = self.net(*args, **kwargs)
        self.clock.lap("forward")
        return out
