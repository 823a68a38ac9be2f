"""The linear interpolant and the training-time samplers of ``t``.

Convention (JiT Eq. 1): ``t = 1`` is data, ``t = 0`` is noise,

    z_t = t·x + (1 − t)·ε,   ε ~ N(0, s²·I),   v = dz_t/dt = x − ε   (Eq. 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

TimeKind = Literal["logit_normal", "uniform"]


def expand_t(t: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample times ``[B]`` to broadcast against ``like`` ``[B, ...]``."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``z_t = t·x + (1 − t)·ε`` (JiT Eq. 1). ``x, eps: [B, ...]``, ``t: [B]``."""
    tb = expand_t(t, x)
    return tb * x + (1 - tb) * eps


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Resolution shift of SD3 (Esser et al. 2024, Eq. 23), written in our convention.

    With the noise level ``σ = 1 − t`` the shifted level is ``σ' = k·σ / (1 + (k − 1)·σ)``,
    i.e. ``t' = t / (t + k·(1 − t))``. ``k > 1`` moves mass toward noise (needed at higher
    resolution: ``k = sqrt(m/n)`` maps a schedule tuned for ``n`` pixels to ``m`` pixels);
    ``k = 1`` is the identity.
    """
    if shift == 1.0:
        return t
    return t / (t + shift * (1 - t))


@dataclass(frozen=True)
class TimeSamplerConfig:
    """Training distribution of ``t`` (JiT App. A: ``logit(t) ~ N(μ, σ²)``, μ=−0.8, σ=0.8)."""

    kind: TimeKind = "logit_normal"
    mu: float = -0.8
    sigma: float = 0.8
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("logit_normal", "uniform"):
            raise ValueError(f"time.kind={self.kind!r}; valid: 'logit_normal', 'uniform'")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"time.sigma={self.sigma!r} must be a positive finite number")
        if not self.shift > 0:
            raise ValueError(f"time.shift={self.shift!r} must be > 0")


def sample_t(
    cfg: TimeSamplerConfig,
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw ``n`` training times in ``(0, 1)`` (float32 ``[n]``); pure given ``generator``."""
    if cfg.kind == "logit_normal":
        s = torch.randn(n, generator=generator, device=device) * cfg.sigma + cfg.mu
        t = torch.sigmoid(s)
    else:
        t = torch.rand(n, generator=generator, device=device)
    return shift_time(t, cfg.shift)
