"""ODE solvers for ``dz/dt = v(z, t)`` from ``t = 0`` (noise) to ``t = 1`` (data), JiT Eq. 4.

Solvers are pure functions of a *velocity function* ``fn(z, t) -> v`` where ``z: [B, ...]`` and
``t`` is a Python float shared by the batch (so checks on ``t`` never synchronise with a device),
and of a precomputed time grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

VelocityFn = Callable[[Tensor, float], Tensor]
Solver = Literal["euler", "heun"]


def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> list[float]:
    """``steps + 1`` times, linear in ``[t_start, t_end]`` (JiT Table 9: linear in [0, 1])."""
    if steps < 1:
        raise ValueError(f"steps={steps!r} must be >= 1")
    return [t_start + (t_end - t_start) * i / steps for i in range(steps + 1)]


def euler(fn: VelocityFn, z: Tensor, grid: Sequence[float]) -> Tensor:
    """Explicit Euler, first order: ``z ← z + (t' − t)·v(z, t)`` (JiT Alg. 2)."""
    for t, t_next in itertools.pairwise(grid):
        z = z + (t_next - t) * fn(z, t)
    return z


def heun(fn: VelocityFn, z: Tensor, grid: Sequence[float]) -> Tensor:
    """Heun's second-order method; the last step is Euler, as in the JiT reference code.

    The last step ends at ``t = 1`` where x-prediction's velocity ``(x̂ − z)/(1 − t)`` is only
    defined through the clamp, so it is never evaluated there.
    """
    n = len(grid) - 1
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        dt = t_next - t
        v = fn(z, t)
        if i == n - 1:
            z = z + dt * v
        else:
            z_euler = z + dt * v
            z = z + dt * 0.5 * (v + fn(z_euler, t_next))
    return z


SOLVERS: dict[str, Callable[[VelocityFn, Tensor, Sequence[float]], Tensor]] = {
    "euler": euler,
    "heun": heun,
}


def sample(fn: VelocityFn, noise: Tensor, steps: int = 50, solver: Solver | str = "heun") -> Tensor:
    """Integrate from ``z_0 = noise`` (already scaled by ``noise_scale``) to ``t = 1``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; valid: {', '.join(map(repr, SOLVERS))}")
    return SOLVERS[solver](fn, noise, time_grid(steps))


def nfe(steps: int, solver: Solver | str) -> int:
    """Velocity evaluations a solver makes over ``steps`` steps (Heun: 2 per step, last 1)."""
    return steps if solver == "euler" else 2 * steps - 1
