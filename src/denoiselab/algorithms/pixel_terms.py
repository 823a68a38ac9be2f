"""What the perceptual terms (``terms.lpips``, ``terms.pdino``) share: a time window, the
decode to pixels, and the weighting. Not a technique itself (registers nothing).

For a batch with x-prediction x̂ ``[B, C, H, W]`` (pixels or latents), target x and times t
``[B]`` (t = 1 is data), a term with config ``(weight, t_min)`` and a frozen per-sample
distance ``d(a, b) -> [B]`` on decoded pixels gives

    term_i = weight · d(D(x̂_i), D(x_i))   if t_i ≥ t_min,   0 otherwise

D: the run's decoder (identity for pixel runs, the frozen autoencoder for latent runs;
differentiable for x̂, a constant for x). Only the samples inside the window are decoded and
passed through the frozen network; a batch with none of them returns zeros without calling
it. The batch loss is then the mean over all B samples (the objective's), so a window scales
the term by the fraction of samples inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from denoiselab.config import ConfigError
from denoiselab.objectives import LossTerm, StepContext


def check_weight_and_window(key: str, weight: float, t_min: float) -> None:
    """ConfigError unless ``weight > 0`` and ``0 ≤ t_min < 1`` (``key``: e.g. ``terms.lpips``)."""
    if not weight > 0:
        raise ConfigError(f"{key}.weight={weight!r} must be > 0")
    if not 0 <= t_min < 1:
        raise ConfigError(f"{key}.t_min={t_min!r} must lie in [0, 1)")


def check_image_channels(key: str, ctx: Any) -> None:
    """A pixel run's images must be RGB or grey (a latent run is decoded to RGB first);
    ``ctx``: the :class:`~denoiselab.algorithms.TermContext`."""
    channels = getattr(ctx.dataset, "channels", 3)
    if ctx.data.name != "latents" and channels not in (1, 3):
        raise ConfigError(f"{key} compares RGB or grey images; the data has {channels} channels")


class PixelDistanceTerm(LossTerm):
    """``weight · distance(D(x̂), D(x))`` per sample where ``t ≥ t_min`` (module docstring).

    Subclasses set ``name`` and implement :meth:`distance`; ``cfg`` needs ``weight`` and
    ``t_min``; ``decode``: ``[b, C, h, w] -> [b, 1|3, H, W]`` pixels in about ``[-1, 1]``.
    The frozen network lives on the subclass, outside every module tree (never saved).
    """

    def __init__(self, cfg: Any, decode: Callable[[Tensor], Tensor]) -> None:
        self.cfg, self.decode = cfg, decode

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - interface
        """Per-sample distance ``[b]`` of decoded ``pred`` (with graph) and ``target`` (none)."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> Tensor:
        out = ctx.t.new_zeros(ctx.t.shape, dtype=torch.float32)
        idx = (ctx.t >= self.cfg.t_min).nonzero().squeeze(1)
        if idx.numel() == 0:  # no decode, no frozen network at all
            return out
        pred = self.decode(ctx.pred.x[idx])
        with torch.no_grad():
            target = self.decode(ctx.x[idx])
        return out.index_put((idx,), self.cfg.weight * self.distance(pred, target))


__all__ = ["PixelDistanceTerm", "check_image_channels", "check_weight_and_window"]
