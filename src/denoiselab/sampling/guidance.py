"""Classifier-free guidance (Ho & Salimans 2022) with a guidance interval (Kynkäänniemi 2024).

    v = v_u + ω·(v_c − v_u)   for t inside the interval,   v = v_c   outside it.

Outside the interval the unconditional pass is skipped; inside it the conditional and
unconditional passes run as one batched network call. Guidance is linear, so guiding the
velocity equals guiding x̂ (JiT reference code guides x̂, then converts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from denoiselab.models.condition import Condition

# (net_out, z_t, t[B]) -> velocity; e.g. DenoisingObjective.velocity
ToVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_at(t: float, scale: float, interval: tuple[float, float]) -> bool:
    """Whether guidance acts at time ``t``: a scale other than 1 and ``t`` inside the interval
    ``(lo, hi)`` (``lo`` included when it is 0, JiT's convention)."""
    lo, hi = interval
    return scale != 1.0 and t < hi and (lo == 0.0 or t > lo)


@dataclass
class ClassifierFreeGuidance:
    """A velocity function ``fn(z, t)`` for the solvers, built from a network.

    Args:
        net: ``net(z_t [B,...], t [B], y [B]) -> raw output``.
        to_velocity: converts the raw output to velocity (prediction-space aware).
        y: class labels ``[B]`` (or a text run's token ids ``[B, L]``).
        null_class: the unconditional input's source: the network's condition kind
            (:mod:`denoiselab.models.condition`; its ``null_like(y)``, e.g. the null class or
            the empty prompt), or a null label filled in everywhere (e.g. ``num_classes``).
        y_null: the unconditional condition instead of ``null_class``'s, e.g. a negative
            prompt's ids ``[B, L]``.
        scale: guidance scale ω (1 disables guidance entirely).
        interval: ``(lo, hi)``; guidance applies where ``lo < t < hi`` (``lo = 0`` inclusive),
            the rule of the JiT reference code. Default ``(0.1, 1.0)`` (JiT Table 9).

    ``calls`` and ``images_evaluated`` count network calls and per-image evaluations.
    """

    net: Callable[..., Tensor]
    to_velocity: ToVelocity
    y: Tensor
    null_class: int | Condition
    scale: float = 1.0
    interval: tuple[float, float] = (0.1, 1.0)
    calls: int = 0
    images_evaluated: int = 0
    y_null: Tensor | None = None

    def __post_init__(self) -> None:
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg interval {self.interval!r} must satisfy 0 <= lo <= hi <= 1")
        if self.y_null is not None and self.y_null.shape != self.y.shape:
            raise ValueError(
                f"unconditional input of shape {list(self.y_null.shape)} does not match the "
                f"condition's {list(self.y.shape)}"
            )
        null = self.null_class
        if self.y_null is not None:
            self._y_null = self.y_null
        elif hasattr(null, "null_like"):  # a condition kind
            self._y_null = null.null_like(self.y)
        else:  # a null label
            self._y_null = torch.full_like(self.y, int(null))
        self._y_both = torch.cat([self.y, self._y_null])

    def guided(self, t: float) -> bool:
        return guided_at(t, self.scale, self.interval)

    def __call__(self, z: Tensor, t: float) -> Tensor:
        b = z.shape[0]
        self.calls += 1
        if not self.guided(t):
            self.images_evaluated += b
            t_vec = z.new_full((b,), t)
            return self.to_velocity(self.net(z, t_vec, self.y), z, t_vec)
        self.images_evaluated += 2 * b
        z2 = torch.cat([z, z])
        t2 = z.new_full((2 * b,), t)
        v_c, v_u = self.to_velocity(self.net(z2, t2, self._y_both), z2, t2).chunk(2)
        return v_u + self.scale * (v_c - v_u)


@dataclass
class SparseGuidance:
    """Sparse guidance (Krause et al. 2026, "Guiding Token-Sparse Diffusion Models", by the
    TREAD authors): a network trained with token routing guided by its own routed self, both
    conditional,

        v = v_w + ω·(v_f − v_w)   for t inside the interval,   v = v_f   outside it,

    ``v_f`` the full network, ``v_w`` the same network with a route (``routes(B)``: kept patch
    indices drawn afresh for every evaluation from the caller's seeded generator). A velocity
    function ``fn(z, t)`` for the solvers, like :class:`ClassifierFreeGuidance`.
    """

    net: Callable[..., Tensor]
    to_velocity: ToVelocity
    y: Tensor
    routes: Callable[[int], Tensor]
    scale: float = 1.0
    interval: tuple[float, float] = (0.1, 1.0)
    calls: int = 0
    images_evaluated: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance interval {self.interval!r} must satisfy 0 <= lo <= hi <= 1")

    def guided(self, t: float) -> bool:
        return guided_at(t, self.scale, self.interval)

    def __call__(self, z: Tensor, t: float) -> Tensor:
        b = z.shape[0]
        self.calls += 1
        t_vec = z.new_full((b,), t)
        v_full = self.to_velocity(self.net(z, t_vec, self.y), z, t_vec)
        self.images_evaluated += b
        if not self.guided(t):
            return v_full
        self.images_evaluated += b
        v_weak = self.to_velocity(self.net(z, t_vec, self.y, route=self.routes(b)), z, t_vec)
        return v_weak + self.scale * (v_full - v_weak)
