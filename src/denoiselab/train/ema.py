"""Exponential moving averages of the weights, kept in float32 (one copy per decay)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """``θ_ema ← d·θ_ema + (1 − d)·θ`` after each optimizer step, for each decay ``d``.

    With ``warmup`` the effective decay is ``min(d, (1 + n)/(10 + n))`` at update ``n``.
    Buffers (none in JiT besides derived tables) are not averaged.
    """

    def __init__(self, model: nn.Module, decays: tuple[float, ...], warmup: bool = False) -> None:
        self.decays = tuple(decays)
        self.warmup = warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = {
            d: [p.detach().float().clone() for p in self._live(model)] for d in self.decays
        }

    def _live(self, model: nn.Module) -> list[Tensor]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        live = [p.detach().float() for p in self._live(model)]
        for d, shadow in self.params.items():
            eff = min(d, (1 + num_updates) / (10 + num_updates)) if self.warmup else d
            torch._foreach_lerp_(shadow, live, 1.0 - eff)

    def state(self, decay: float) -> dict[str, Tensor]:
        return dict(zip(self.names, self.params[decay]))

    def load(self, decay: float, tensors: dict[str, Tensor]) -> None:
        missing = set(self.names) - set(tensors)
        if missing:
            raise KeyError(f"EMA {decay}: checkpoint lacks {sorted(missing)[:3]}…")
        for dst, name in zip(self.params[decay], self.names):
            dst.copy_(tensors[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module, decay: float) -> None:
        """Overwrite ``model``'s parameters with the EMA of ``decay``."""
        for p, s in zip(self._live(model), self.params[decay]):
            p.copy_(s)
