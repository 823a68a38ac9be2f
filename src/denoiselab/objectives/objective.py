"""The denoising training objective: per-sample loss terms for one batch.

Algorithm 1 of JiT, generalised to all nine prediction × loss combinations:

    t ~ p(t);  ε ~ N(0, s²I);  z = t·x + (1−t)·ε
    out = net(z, t, y)                                   # raw network output
    pred = convert(out, prediction)                      # (x̂, ε̂, v̂), Table 1
    target = convert(truth_in_prediction_space, prediction)
    loss = mean over dims of (pred[L] − target[L])²      # L = loss space

The target is converted with the same clamped formula as the prediction (as the official JiT
code does for ``v = (x − z)/(1 − t)``), so every combination is an exact reweighting of the
loss in prediction space — footnote 4 of the paper holds for every ``t``, clamp included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from denoiselab.models.condition import ByShape, Condition
from denoiselab.objectives.parameterization import (
    LossSpace,
    Prediction,
    Triple,
    convert,
    min_snr_weight,
    parse_space,
    preconditioner_coefficients,
)
from denoiselab.objectives.path import TimeSamplerConfig, expand_t, interpolate, sample_t

if TYPE_CHECKING:
    from denoiselab.models.routing import RouteSampler

Preconditioner = Literal["none", "edm", "linear"]
Weighting = Literal["none", "min_snr"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Everything that defines the denoising loss (JiT Table 9 defaults).

    ``noise_scale`` is ``s`` in ``ε ~ N(0, s²I)``; the paper uses ``1.0 × image_size/256``.
    ``"auto"`` (the default) stands for that rule and is resolved where the data are known
    (``TrainConfig.resolved``: ``image_size/256`` for pixels, 1.0 for latents); a
    :class:`DenoisingObjective` needs the number.
    ``t_eps`` clamps ``1 − t`` (and ``t`` for ε-prediction) wherever it divides.
    ``label_drop`` replaces the condition by its null with this probability (for CFG): the
    null class, or in a text run the empty prompt (caption dropout; see
    :mod:`denoiselab.models.condition`).
    ``contrastive``: weight λ ∈ [0, 1) of contrastive flow matching (ΔFM, Stoica et al. 2025;
    seeds/002), a ``contrastive`` loss term; 0 (the paper) leaves it out.
    ``weighting: min_snr``: Min-SNR-γ (Hang et al. 2023, γ = ``min_snr_gamma``), applied so
    that the effective weight on the x-space error is ``min(SNR, γ)`` in every loss space,
    ``SNR = t²/((1−t)²s²)`` (``parameterization.min_snr_weight`` derives the conversion).
    ``routing_until``: for a network with token routing (``model.routing``), the fraction of the
    run trained routed; the rest, at the end, trains the full network (SPRINT's short
    full-token fine-tuning stage, e.g. 0.9). 1: routed to the end.
    """

    prediction: str = "x"
    loss_space: str = "v"
    t_eps: float = 0.05
    noise_scale: float | Literal["auto"] = "auto"
    time: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    preconditioner: Preconditioner = "none"
    sigma_data: float = 0.5
    weighting: Weighting = "none"
    min_snr_gamma: float = 5.0
    label_drop: float = 0.1
    contrastive: float = 0.0
    routing_until: float = 1.0

    def __post_init__(self) -> None:
        pred = parse_space(self.prediction, Prediction)
        parse_space(self.loss_space, LossSpace)
        if self.preconditioner not in ("none", "edm", "linear"):
            raise ValueError(
                f"objective.preconditioner={self.preconditioner!r}; valid: 'none', 'edm', 'linear'"
            )
        if self.preconditioner != "none" and pred is not Prediction.X:
            raise ValueError(
                f"objective.preconditioner={self.preconditioner!r} wraps x-prediction only "
                f"(JiT App. B.2); got prediction={self.prediction!r}"
            )
        if self.weighting not in ("none", "min_snr"):
            raise ValueError(f"objective.weighting={self.weighting!r}; valid: 'none', 'min_snr'")
        if not self.min_snr_gamma > 0:  # also refuses NaN; inf = plain SNR weighting
            raise ValueError(f"objective.min_snr_gamma={self.min_snr_gamma!r} must be > 0")
        if not 0 < self.t_eps < 0.5:
            raise ValueError(f"objective.t_eps={self.t_eps!r} must lie in (0, 0.5)")
        s = self.noise_scale
        if s != "auto" and not (
            isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 and math.isfinite(s)
        ):
            raise ValueError(f"objective.noise_scale={s!r} must be > 0 or 'auto' (image_size/256)")
        if not 0 <= self.label_drop < 1:
            raise ValueError(f"objective.label_drop={self.label_drop!r} must lie in [0, 1)")
        if not 0 <= self.contrastive < 1:
            raise ValueError(f"objective.contrastive={self.contrastive!r} must lie in [0, 1)")
        if not 0 < self.routing_until <= 1:
            raise ValueError(f"objective.routing_until={self.routing_until!r} must lie in (0, 1]")

    @property
    def pred(self) -> Prediction:
        return parse_space(self.prediction, Prediction)  # type: ignore[return-value]

    @property
    def loss(self) -> LossSpace:
        return parse_space(self.loss_space, LossSpace)  # type: ignore[return-value]


@dataclass
class StepContext:
    """What one objective evaluation saw; handed to extra loss terms (REPA, contrastive FM…).

    ``hidden``: block index → patch-token states ``[B, N, D]`` for the blocks requested by
    the extra terms (see ``LossTerm.hidden_blocks``).
    ``nimg``: images seen by the run before this step (a term's schedule reads it).
    ``extras``: per-sample side data of the batch (e.g. precomputed teacher features), each
    ``[B, ...]``, keyed by name; empty when the data provides none.
    ``route``: the kept patch indices ``[B, K]`` of a routed step (token routing,
    ``models.routing``) and ``routed_blocks`` the blocks they applied to; ``None`` and empty
    for a dense step. Use :meth:`tokens_through` before comparing a routed block's hidden
    state with anything.
    """

    x: Tensor
    y: Tensor
    t: Tensor
    eps: Tensor
    z_t: Tensor
    net_out: Tensor
    pred: Triple
    target: Triple
    hidden: dict[int, Tensor]
    nimg: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)
    route: Tensor | None = None
    routed_blocks: range = range(0)

    def tokens_through(self, block: int) -> Tensor | None:
        """The patch indices ``[B, K]`` of the tokens that went through ``block`` in this step,
        or ``None`` when all did. Rows of ``hidden[block]`` outside them carry values that
        skipped the block: an alignment must use only these rows (``models.routing.gather_tokens``)."""
        return self.route if self.route is not None and block in self.routed_blocks else None


class LossTerm:
    """An extra named per-sample loss term: ``term(ctx: StepContext) -> [B]``. Subclasses set
    ``name`` and implement ``forward(ctx)``.

    ``hidden_blocks``: network blocks whose hidden states the term needs.

    A term that owns parameters (a projector) also subclasses ``nn.Module`` (as
    ``class T(nn.Module, LossTerm)``): the objective registers it (as ``extra.<name>``), and
    the training loop optimises, clips, DDP-averages, checkpoints and restores everything in
    ``objective.state_dict()``. Frozen helpers (a teacher encoder) must therefore stay out of
    the term's ``state_dict``: hold them outside the module tree.

    ``may_skip``: such a term must give all its parameters a gradient on every step (the
    loop stops with a named error otherwise: under DDP an unused parameter would leave its
    gradient un-averaged). A term that may leave them unused on some steps (a weight
    schedule that ends, after which the term returns zeros without computing anything) sets
    ``may_skip = True``: DDP then searches the graph for unused parameters each step
    (``find_unused_parameters``, a small cost), and on a step where no rank used them they
    get no gradient and the optimizer leaves them (and their moments) untouched, exactly as
    in one process.
    """

    name: str = "extra"
    hidden_blocks: tuple[int, ...] = ()
    may_skip: bool = False

    def __call__(self, ctx: StepContext) -> Tensor:
        return self.forward(ctx)

    def forward(self, ctx: StepContext) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def logs(self, nimg: int) -> dict[str, float]:
        """Scalars to log beside the loss after ``nimg`` images (e.g. a weight schedule),
        keyed ``"<name>/<what>"``; none by default."""
        return {}


def mean_square(diff: Tensor) -> Tensor:
    """Per-sample mean of ``diff²`` ``[B, ...] -> [B]``, in at least float32 (bf16 → fp32 loss)."""
    diff = diff.to(torch.promote_types(diff.dtype, torch.float32))
    return diff.pow(2).flatten(1).mean(1)


class ContrastiveFlowMatching(LossTerm):
    """ΔFM's push-away term: ``−λ·mean‖p̂ − p̃‖²`` per sample, where ``p̂`` is the prediction
    in the loss space and ``p̃`` the target of another sample of the batch (the next one,
    cyclically: the batch is already in random order). With the v-loss, ``p̃ = x̃ − ε̃`` is
    the other sample's transport direction (seeds/002, Stoica et al. 2025); the total loss
    ``‖p̂ − p‖² − λ‖p̂ − p̃‖²`` stays bounded below for λ < 1.

    ``time_weight(t) [B]``: the per-sample weight ``w(t)`` the denoising term carries
    (``objective.weighting``); the push-away term carries it too, so the total
    ``w(t)·(‖p̂ − p‖² − λ‖p̂ − p̃‖²)`` stays bounded below (unweighted, it would dominate
    wherever ``w(t) < λ`` and drive ``p̂`` to infinity). None: 1.
    """

    name = "contrastive"

    def __init__(
        self, weight: float, space: LossSpace, time_weight: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.weight, self.space, self.time_weight = weight, space, time_weight

    def forward(self, ctx: StepContext) -> Tensor:
        if ctx.x.shape[0] < 2:  # the only other sample would be itself
            raise ValueError(
                f"objective.contrastive={self.weight!r} pairs each sample with another of its "
                f"micro-batch, which has {ctx.x.shape[0]} sample: use global_batch / "
                "(grad_accum × processes) >= 2 or objective.contrastive: 0"
            )
        negative = ctx.target.get(self.space).roll(1, dims=0)
        push = -self.weight * mean_square(ctx.pred.get(self.space) - negative)
        return push if self.time_weight is None else push * self.time_weight(ctx.t)


Net = Callable[..., Tensor]


class DenoisingObjective(nn.Module):
    """Computes ``{"denoise": [B], <extra terms>: [B]}`` for a batch.

    It is an ``nn.Module`` only so that extra terms with parameters (e.g. a REPA projector)
    are trained and checkpointed with it; the core loss has no parameters. ``condition``: the
    network's condition kind, whose null replaces dropped labels
    (:func:`~denoiselab.models.condition.condition_for`; default: told by the labels' shape,
    :class:`~denoiselab.models.condition.ByShape`).
    """

    def __init__(
        self,
        cfg: ObjectiveConfig,
        num_classes: int,
        extra_terms: list[LossTerm] | None = None,
        routes: RouteSampler | None = None,
        routes_until_nimg: float = math.inf,
        *,
        condition: Condition | None = None,
    ) -> None:
        super().__init__()
        if cfg.noise_scale == "auto":
            raise ValueError(
                "objective.noise_scale='auto' must be resolved from the data before the "
                "objective is built (TrainConfig.resolved(): image_size/256 for pixels, 1.0 for "
                "latents), or given as a number"
            )
        self.cfg = cfg
        self.condition = ByShape(num_classes) if condition is None else condition
        self.routes = routes  # token routing: the objective draws the route, the network obeys
        self.routes_until_nimg = routes_until_nimg  # then dense (a full-token fine-tuning stage)
        self.extra_terms = list(extra_terms or [])
        if cfg.contrastive > 0:
            self.extra_terms.append(ContrastiveFlowMatching(cfg.contrastive, cfg.loss, self.weight))
        names = ["denoise", *(term.name for term in self.extra_terms)]
        if len(set(names)) < len(names):  # one would overwrite the other's loss
            raise ValueError(f"loss terms need distinct names; got {names}")
        # by name, so a term's checkpointed state does not move when other terms come or go
        self.extra = nn.ModuleDict(
            {t.name: t for t in self.extra_terms if isinstance(t, nn.Module)}
        )

    @property
    def may_skip(self) -> bool:
        """Whether a term with trainable parameters may leave them unused on some steps."""
        return any(
            t.may_skip and any(p.requires_grad for p in t.parameters()) for t in self.extra.values()
        )

    def required_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters of terms that must use them on every step (``may_skip``
        False), with their names in ``state_dict``."""
        return [
            (f"extra.{name}.{pname}", p)
            for name, term in self.extra.items()
            if not term.may_skip
            for pname, p in term.named_parameters()
            if p.requires_grad
        ]

    # -- conversions -------------------------------------------------------------------------
    def complete(self, net_out: Tensor, z_t: Tensor, t: Tensor) -> Triple:
        """Raw network output → ``(x̂, ε̂, v̂)``, applying the preconditioner if any."""
        cfg = self.cfg
        if cfg.preconditioner != "none":
            c_skip, c_out = preconditioner_coefficients(
                cfg.preconditioner, t, sigma_data=cfg.sigma_data, t_eps=cfg.t_eps
            )
            net_out = expand_t(c_skip, z_t) * z_t + expand_t(c_out, z_t) * net_out
        return convert(net_out, cfg.pred, z_t, t, cfg.t_eps)

    def velocity(self, net_out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """Velocity ``v̂`` that the sampler integrates, from any prediction space (Table 1 row 3)."""
        return self.complete(net_out, z_t, t).v

    def weight(self, t: Tensor) -> Tensor:
        """Optional explicit per-sample weight ``[B]`` on top of the loss-space reweighting.

        ``min_snr``: Min-SNR-γ for this loss space and prediction
        (:func:`~denoiselab.objectives.parameterization.min_snr_weight`): the effective
        weight on the x-space error is ``min(SNR, γ)`` whatever the loss space.
        """
        if self.cfg.weighting == "min_snr":
            cfg = self.cfg
            return min_snr_weight(
                t,
                cfg.min_snr_gamma,
                cfg.noise_scale,
                prediction=cfg.pred,
                loss_space=cfg.loss,
                t_eps=cfg.t_eps,
            )
        return torch.ones_like(t)

    # -- randomness --------------------------------------------------------------------------
    def draw(self, x: Tensor, y: Tensor, generator: torch.Generator | None) -> tuple[Tensor, ...]:
        """Draw ``t [B]``, ``ε [B, ...]`` and the (possibly dropped) labels for one batch."""
        b = x.shape[0]
        t = sample_t(self.cfg.time, b, generator=generator, device=x.device)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        eps = eps * self.cfg.noise_scale
        if self.cfg.label_drop > 0:
            drop = torch.rand(b, generator=generator, device=x.device) < self.cfg.label_drop
            null = self.condition.null_like(y)
            y = torch.where(drop.view(b, *[1] * (y.dim() - 1)), null, y)
        return t, eps, y

    # -- the loss ----------------------------------------------------------------------------
    def forward(
        self,
        net: Net,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        *,
        nimg: int = 0,
        extras: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample loss terms for clean data ``x: [B, ...]`` and labels ``y: [B]``;
        ``nimg`` and ``extras`` are handed to the extra terms (see :class:`StepContext`)."""
        t, eps, y = self.draw(x, y, generator)
        route = None
        if self.routes is not None and nimg < self.routes_until_nimg:  # drawn after t, ε, y
            route = self.routes(x.shape[0], generator, x.device)
        return self.terms(net, x, y, t, eps, nimg=nimg, extras=extras, route=route)

    def logs(self, nimg: int) -> dict[str, float]:
        """The extra terms' scalars to log after ``nimg`` images (see :meth:`LossTerm.logs`)."""
        out: dict[str, float] = {}
        for term in self.extra_terms:
            out.update(term.logs(nimg))
        return out

    def terms(
        self,
        net: Net,
        x: Tensor,
        y: Tensor,
        t: Tensor,
        eps: Tensor,
        *,
        nimg: int = 0,
        extras: dict[str, Tensor] | None = None,
        route: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Deterministic part of :meth:`forward`: the loss terms for given ``t``, ``ε`` (and
        ``route``, the kept patch indices of a routed step)."""
        z_t = interpolate(x, eps, t)
        blocks = sorted({b for term in self.extra_terms for b in term.hidden_blocks})
        hidden: dict[int, Tensor] = dict.fromkeys(blocks)  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {"hidden_out": hidden} if blocks else {}
        if route is not None:
            kwargs["route"] = route
        net_out = net(z_t, t, y, **kwargs)
        pred = self.complete(net_out, z_t, t)
        truth = {Prediction.X: x, Prediction.EPS: eps, Prediction.V: x - eps}[self.cfg.pred]
        target = convert(truth, self.cfg.pred, z_t, t, self.cfg.t_eps)
        diff = pred.get(self.cfg.loss) - target.get(self.cfg.loss)
        out = {"denoise": mean_square(diff) * self.weight(t)}
        if self.extra_terms:
            routed = self.routes.blocks if route is not None and self.routes else range(0)
            ctx = StepContext(
                x, y, t, eps, z_t, net_out, pred, target, hidden, nimg, dict(extras or {}),
                route, routed,
            )  # fmt: skip
            for term in self.extra_terms:
                out[term.name] = term(ctx)
        return out
