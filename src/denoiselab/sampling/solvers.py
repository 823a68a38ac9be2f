"""Solvers from ``t = 0`` (noise) to ``t = 1`` (data): the ODE ``dz/dt = v(z, t)`` (JiT Eq. 4)
and the reverse SDE with the same marginals.

Solvers are pure functions of a *velocity function* ``fn(z, t) -> v`` where ``z: [B, ...]`` and
``t`` is a Python float shared by the batch (so checks on ``t`` never synchronise with a device),
and of a precomputed time grid (and, for the SDE, of a seeded generator).

The SDE. For ``z_t = t·x + (1−t)·ε``, ``ε ~ N(0, s²I)``, every SDE

    dz = [v(z, t) + ½·g(t)²·∇log p_t(z)] dt + g(t) dW

has the ODE's marginals ``p_t`` (Fokker–Planck: the added drift cancels the diffusion). By
Tweedie, ``∇log p_t(z) = −ε̂/((1−t)s²)`` with ``ε̂ = E[ε | z] = z − t·v`` (Table 1, v row).
With ``g(t)² = 2η(1−t)s²`` the drift becomes ``v − η·ε̂``:

    dz = (v − η·(z − t·v)) dt + s·√(2η(1−t)) dW,

``η = 0`` is the ODE; larger ``η`` re-injects more noise early (where ``1 − t`` is large)
and none at ``t = 1``. :func:`euler_maruyama` integrates it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, float], Tensor]
Solver = Literal["euler", "heun", "euler_maruyama"]


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


def euler_maruyama(
    fn: VelocityFn,
    z: Tensor,
    grid: Sequence[float],
    *,
    eta: float = 1.0,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler–Maruyama for the reverse SDE of the module docstring:
    ``z ← z + Δt·(v − η·(z − t·v)) + s·√(2η(1−t)Δt)·ξ``, ``ξ ~ N(0, I)`` drawn on the CPU from
    ``generator`` (so a seed gives the same samples on every device). The last step adds no
    noise: its ``g·√Δt`` would leave noise of order ``s·√(2η)·Δt`` in the final sample.
    """
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} must be >= 0 (0 is the ODE)")
    n = len(grid) - 1
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        dt = t_next - t
        v = fn(z, t)
        z = z + dt * (v - eta * (z - t * v))
        if eta > 0 and i < n - 1:
            xi = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z)
            z = z + noise_scale * math.sqrt(2 * eta * (1 - t) * dt) * xi
    return z


SOLVERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "euler_maruyama": euler_maruyama,
}
STOCHASTIC = ("euler_maruyama",)


def sample(
    fn: VelocityFn,
    noise: Tensor,
    steps: int = 50,
    solver: Solver | str = "heun",
    *,
    eta: float = 1.0,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrate from ``z_0 = noise`` (already scaled by ``noise_scale``) to ``t = 1``.

    ``eta``, ``noise_scale`` and ``generator`` are used by the SDE solver only."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; valid: {', '.join(map(repr, SOLVERS))}")
    if solver in STOCHASTIC:
        return euler_maruyama(
            fn, noise, time_grid(steps), eta=eta, noise_scale=noise_scale, generator=generator
        )
    return SOLVERS[solver](fn, noise, time_grid(steps))


def nfe(steps: int, solver: Solver | str) -> int:
    """Velocity evaluations a solver makes over ``steps`` steps (Heun: 2 per step, last 1)."""
    return 2 * steps - 1 if solver == "heun" else steps
