"""Distances used by the toy experiment: sliced Wasserstein-2 and off-manifold energy."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sliced_wasserstein2(a: Tensor, b: Tensor, num_directions: int = 128) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds ``a, b: [N, d]``.

    ``SW₂(a, b)² = mean_θ W₂²(θᵀa, θᵀb)``; in one dimension ``W₂²`` is the mean squared
    difference of the sorted projections. For ``d = 2`` the directions are
    ``num_directions`` evenly spaced angles in ``[0, π)`` (deterministic); for ``d ≠ 2`` they
    come from a fixed-seed Gaussian draw. Returns ``SW₂`` (same units as the data).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two [N, d] clouds of equal shape, got {a.shape} and {b.shape}")
    a, b = a.double(), b.double()
    d = a.shape[1]
    if d == 2:
        angles = torch.arange(num_directions, dtype=torch.float64) * (math.pi / num_directions)
        theta = torch.stack([angles.cos(), angles.sin()], dim=1)
    else:
        g = torch.Generator().manual_seed(0)
        theta = torch.randn(num_directions, d, generator=g, dtype=torch.float64)
        theta = theta / theta.norm(dim=1, keepdim=True)
    pa = (a @ theta.T).sort(dim=0).values
    pb = (b @ theta.T).sort(dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


def off_manifold_energy(x: Tensor, proj: Tensor) -> Tensor:
    """``‖(I − P Pᵀ) x‖²`` per sample: ``x: [N, D]``, ``proj = P: [D, d]`` with ``PᵀP = I``.

    Returns ``[N]``; zero for points on the data subspace ``span(P)``.
    """
    residual = x - (x @ proj) @ proj.T
    return residual.pow(2).sum(dim=1)
