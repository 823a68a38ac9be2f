"""Exponential moving averages of the weights, kept in float32 (one copy per decay)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def auto_decay(decays: tuple[float, ...], steps: int) -> float:
    """The decay ``"auto"`` means after ``steps`` optimizer steps: the largest one whose
    averaging horizon ``1/(1 − d)`` is at most a tenth of the run, else the smallest.

    A long run gets its slowest average (JiT-B/16's 0.9999 after 3M steps); a short run
    (the quickstart's 5400 steps: 0.995, horizon 200) the one that has forgotten its
    initialisation. Used by training grids, periodic evaluation, ``denoiselab sample``/``eval``
    and ablation suites alike.
    """
    if not decays:
        raise ValueError("auto_decay: no EMA decays to choose from")
    fits = [d for d in decays if 1.0 / (1.0 - d) <= steps / 10]
    return max(fits) if fits else min(decays)


def _local(t: Tensor) -> Tensor:
    """This rank's slice of a DTensor (a view: in-place updates reach the DTensor), else
    ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """``θ_ema ← d·θ_ema + (1 − d)·θ`` after each optimizer step, for each decay ``d``.

    With ``warmup`` the effective decay is ``min(d, (1 + n)/(10 + n))`` at update ``n``.
    Buffers (none in JiT besides derived tables) are not averaged. Under FSDP the parameters
    are DTensors: each copy is then a DTensor with the same placement, and the update works
    on the local slices (no communication).
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
        live = [_local(p.detach()).float() for p in self._live(model)]
        for d, shadow in self.params.items():
            eff = min(d, (1 + num_updates) / (10 + num_updates)) if self.warmup else d
            torch._foreach_lerp_([_local(s) for s in shadow], live, 1.0 - eff)

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
