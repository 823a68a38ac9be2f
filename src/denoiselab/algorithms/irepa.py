"""iREPA (Singh et al. 2025): REPA with a 3×3 convolutional projector and spatially
normalised teacher tokens.

From the PRX logbook (seeds/002, "iREPA"): "Replace the usual MLP projection head with a
lightweight 3×3 convolutional projection operating on the patch grid. Apply a spatial
normalization to teacher patch tokens that removes a global overlay (mean across spatial
locations) to increase local contrast." The paper's Algorithm 1, for teacher tokens
``x [B, T, D]`` (statistics over the T spatial tokens):

    x = x − γ·mean_T(x);   y = x / (std_T(x) + 1e−6)          (spatial_norm: reference)

with γ = 1 by default (the reference code's). PRX's implementation instead uses a per-token
γ, the token's own channel mean (``spatial_norm: prx_per_token_gamma``):

    γ_n = mean_D(x_n);   x_n = x_n − γ_n·mean_T(x);   y = x / (std_T(x) + 1e−6)

Everything else (λ, block, teacher, schedule, logging as ``irepa/lambda``) is REPA's
(:mod:`denoiselab.algorithms.repa`). PRX saw iREPA help with DINOv2 and hurt with DINOv3 and
kept it out of its default recipe. The normalisation is applied to the teacher tokens after
their grid is matched to the student's, so its statistics are over the tokens aligned.

Token routing: a routed block's output holds only the kept tokens; the others carry values
from before the routed range. A 3×3 convolution over that mixed grid would align block-k
tokens with shallower neighbours, and its gradient would reach the skipped tokens' earlier
blocks as if they were block k's. PRX refuses the conv projector under TREAD too (it offers
an attention projector instead). So iREPA on a block that ``model.routing`` routes is a
:class:`RoutedAlignmentError` when the run is built; blocks before or after the routed
range are fine (all tokens go through them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from denoiselab.algorithms import TermContext, register
from denoiselab.algorithms.repa import REPA, AlignConfig, build_alignment, describe_alignment
from denoiselab.config import ConfigError
from denoiselab.objectives import StepContext


class RoutedAlignmentError(ConfigError):
    """iREPA asked to align a block that token routing makes sparse."""


SpatialNorm = Literal["reference", "prx_per_token_gamma", "none"]


@dataclass(frozen=True)
class IREPAConfig(AlignConfig):
    """iREPA: :class:`~denoiselab.algorithms.repa.AlignConfig` plus the spatial
    normalisation of the teacher tokens (``reference`` with ``gamma``, PRX's
    ``prx_per_token_gamma``, or ``none``: the conv projector alone)."""

    spatial_norm: SpatialNorm = "reference"
    gamma: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spatial_norm not in ("reference", "prx_per_token_gamma", "none"):
            raise ConfigError(
                f"spatial_norm={self.spatial_norm!r}; valid: reference, prx_per_token_gamma, none"
            )
        if self.spatial_norm != "reference" and self.gamma != 1.0:
            raise ConfigError("gamma is the reference spatial norm's; PRX's γ is per token")


def spatial_norm(x: Tensor, how: str, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Teacher tokens ``[B, T, D]`` normalised over the spatial axis T (module doc)."""
    if how == "none":
        return x
    g = x.mean(dim=2, keepdim=True) if how == "prx_per_token_gamma" else gamma
    x = x - g * x.mean(dim=1, keepdim=True)
    return x / (x.std(dim=1, keepdim=True) + eps)


class IREPA(REPA):
    """REPA with ``h_φ`` = Conv2d(D, D_t, 3, padding 1) on the ``g × g`` token grid and
    spatially normalised targets."""

    name = "irepa"

    def build_projector(self, width: int, teacher_dim: int) -> nn.Module:
        return nn.Conv2d(width, teacher_dim, kernel_size=3, padding=1)

    def project(self, h: Tensor) -> Tensor:
        b, _, d = h.shape
        grid = h.transpose(1, 2).reshape(b, d, *self.grid)
        return self.projector(grid).flatten(2).transpose(1, 2)

    @classmethod
    def check_routing(cls, block: int, model_cfg: Any, key: str) -> None:
        """:class:`RoutedAlignmentError` when ``model.routing`` routes the aligned block."""
        routing = getattr(model_cfg, "routing", None)
        if routing is None or not routing.enabled:
            return
        routed = routing.blocks(model_cfg.depth)
        if block - 1 in routed:
            raise RoutedAlignmentError(
                f"{key}.block={block} aligns the output of block index {block - 1}, which "
                f"model.routing ({routing.kind}) routes (block indices {routed.start} … "
                f"{routed.stop - 1}): iREPA's 3×3 conv projector needs the whole token grid, "
                f"and only the kept tokens went through that block. Set {key}.block to at "
                f"most {routed.start} or more than {routed.stop}, or use terms.repa (its "
                "per-token projector aligns just the tokens that went through)"
            )

    def forward(self, ctx: StepContext) -> Tensor:
        if ctx.tokens_through(self.hidden_blocks[0]) is not None:  # refused when built
            raise RoutedAlignmentError("iREPA on a routed block (see IREPA.check_routing)")
        return super().forward(ctx)

    def targets(self, ctx: StepContext) -> Tensor:
        cfg = self.cfg
        assert isinstance(cfg, IREPAConfig)
        return spatial_norm(super().targets(ctx).float(), cfg.spatial_norm, cfg.gamma)


@register(
    "irepa",
    IREPAConfig,
    "iREPA: REPA with a 3×3 conv projector + spatial norm",
    lambda cfg, mc: describe_alignment(IREPA, cfg, mc, "terms.irepa"),
)
def _build(cfg: IREPAConfig, ctx: TermContext) -> IREPA:
    return build_alignment(IREPA, cfg, ctx, "terms.irepa")  # type: ignore[return-value]
