"""P-DINO: a perceptual loss on the clean-image prediction x̂ in a frozen teacher's patch
features (``terms.pdino``; PixelGen, Ma et al. 2025, as in the PRX code's
``algorithm/perceptual_dino.py``).

x-prediction gives x̂ directly, so x̂ and x can both go through a frozen image encoder and
their patch tokens be compared, token by token:

    pdino(x̂, x) = (1/P) Σ_p ( 1 − cos( f_p(c(x̂)), f_p(c(x)) ) )

f: the teacher's patch tokens ``[B, P, D_t]`` (any teacher of :mod:`denoiselab.encoders`:
the offline SimCLR ViT, DINOv2/v3, CLIP, SigLIP from a local directory), with the encoder's
own preprocessing (``[-1, 1]`` → resize → mean/std); c: clamp to ``[-1, 1]`` (PRX clamps
the ``[0, 1]`` image before DINO, so x̂'s out-of-range pixels get no P-DINO gradient). The
distance is PRX's and PixelGen's: one minus the cosine similarity of patch tokens, averaged
over the patches (in [0, 2]; 0 when the features agree up to a positive scale per token).

The per-sample term is ``weight · pdino(x̂, x)`` for samples with ``t ≥ t_min`` (t = 1 is
data: the less noisy ones) and 0 for the others, like ``terms.lpips``; the batch loss is the
mean over all samples, so a window scales the term by the fraction inside it (PRX divides by
the number of samples inside instead). Defaults are PRX's JiT benchmark config: weight 0.01,
no window (``t_threshold: 1`` there, in its t = 0-is-data convention).

Gradients reach the network through x̂ and the teacher's graph (its weights stay frozen:
no gradient, eval mode); x's features are a constant target (no graph). The teacher is held
outside every module tree (the term is not an ``nn.Module``), so it is never trained,
averaged or checkpointed. Latent runs decode x̂ (differentiably) and x through the run's
frozen autoencoder first; the offline teacher is then the one of the cache's source pixels.
A transformers teacher runs at ``teacher.resolution``, else its family's default (DINOv2:
224, PRX's ``resize_resolution``); the offline one at the data's side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from denoiselab.algorithms import TermContext, register
from denoiselab.algorithms.pixel_terms import (
    PixelDistanceTerm,
    check_image_channels,
    check_weight_and_window,
)
from denoiselab.encoders import ImageEncoder, TeacherConfig, build_teacher


@dataclass(frozen=True)
class PDINOConfig:
    """``terms.pdino``: ``weight`` of the per-sample term (PRX: 0.01); ``t_min``: apply it
    only where ``t ≥ t_min`` (0: everywhere); ``teacher``: the frozen encoder
    (:class:`~denoiselab.encoders.TeacherConfig`, default the offline ViT)."""

    weight: float = 0.01
    t_min: float = 0.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        check_weight_and_window("terms.pdino", self.weight, self.t_min)


def pdino_distance(teacher: ImageEncoder, pred: Tensor, target: Tensor) -> Tensor:
    """``mean_p (1 − cos(f_p(c(pred)), f_p(c(target))))`` per sample ``[B]`` for images
    ``[B, 1|3, H, W]`` in ``[-1, 1]``; differentiable in ``pred``, ``target`` a constant."""
    f_pred = teacher.features(pred.clamp(-1.0, 1.0))
    with torch.no_grad():
        f_target = teacher(target.clamp(-1.0, 1.0))
    cos = F.cosine_similarity(f_pred.float(), f_target.float(), dim=-1, eps=1e-8)  # [B, P]
    return (1.0 - cos).mean(1)


class PDINOTerm(PixelDistanceTerm):
    """``weight · pdino(x̂, x)`` per sample where ``t ≥ t_min`` (module docstring; the window,
    decode and weighting are :class:`~denoiselab.algorithms.pixel_terms.PixelDistanceTerm`'s)."""

    name = "pdino"

    def __init__(
        self, cfg: PDINOConfig, teacher: ImageEncoder, decode: Callable[[Tensor], Tensor]
    ) -> None:
        super().__init__(cfg, decode)
        self.teacher = teacher  # frozen: never saved

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        return pdino_distance(self.teacher, pred, target)


def _describe(cfg: PDINOConfig, model_cfg: Any) -> str:
    window = f"t ≥ {cfg.t_min}" if cfg.t_min > 0 else "every t"
    return (
        f"terms.pdino: {cfg.weight} · mean(1 − cos) of {cfg.teacher.kind} teacher patch "
        f"tokens between x̂ and x, {window} (teacher frozen, not checkpointed)"
    )


@register(
    "pdino",
    PDINOConfig,
    "P-DINO: 1 − cos of frozen-teacher patch tokens between x̂ and x (PRX)",
    _describe,
)
def build_pdino(cfg: PDINOConfig, ctx: TermContext) -> PDINOTerm:
    from denoiselab.latents import differentiable_decoder, pixel_data_config

    check_image_channels("terms.pdino", ctx)
    teacher = build_teacher(  # leaves the global RNG as it was
        cfg.teacher, pixel_data_config(ctx.data), ctx.device, key="terms.pdino.teacher"
    )
    return PDINOTerm(cfg, teacher, differentiable_decoder(ctx.data, ctx.device))


__all__ = ["PDINOConfig", "PDINOTerm", "pdino_distance"]
