"""Generate images from a network: noise → Heun/Euler ODE with CFG interval → x̂ at t = 1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from denoiselab.models.condition import ByShape, Condition
from denoiselab.sampling.guidance import ClassifierFreeGuidance, SparseGuidance, ToVelocity
from denoiselab.sampling.solvers import sample

GUIDANCE = ("cfg", "sparse")


@torch.no_grad()
def generate(
    net: Callable[..., Tensor],
    to_velocity: ToVelocity,
    labels: Tensor,
    noise: Tensor,
    *,
    null_class: int | Condition,
    steps: int = 50,
    solver: str = "heun",
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.1, 1.0),
    eta: float = 1.0,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
    negative: Tensor | None = None,
) -> Tensor:
    """Samples ``[B, C, H, W]`` for class ``labels [B]`` from ``noise`` (already × noise_scale).

    ``noise`` fixes the randomness of the ODE solvers: the same noise and labels give the same
    images; ``solver="euler_maruyama"`` also draws from ``generator`` (``eta``,
    ``noise_scale``: :func:`~denoiselab.sampling.solvers.euler_maruyama`). ``negative``: the
    unconditional branch's condition (a negative prompt's ids) instead of ``null_class``'s
    (a condition kind, or a null label: :class:`ClassifierFreeGuidance`).
    """
    fn = ClassifierFreeGuidance(
        net, to_velocity, labels, null_class, cfg_scale, interval, y_null=negative
    )
    return sample(fn, noise, steps, solver, eta=eta, noise_scale=noise_scale, generator=generator)


@dataclass
class Sampler:
    """A network ready to draw images: seeded noise → :func:`generate` → decoded pixels.

    The one place where a seed becomes images, shared by ``denoiselab sample``/``eval``, the
    training run's sample grids and periodic evaluation, and the ablation scorer, so that the
    same weights, seed and settings give the same images in all of them.

    Args:
        net: ``net(z_t, t, y) -> raw output``; ``velocity`` turns it into a velocity.
        shape: ``(C, H, W)`` of the network's input (latent cells for latent runs).
        num_classes: classes of the network.
        condition: the network's condition kind, which gives CFG its unconditional input
            (:func:`~denoiselab.models.condition.condition_for`: the null class, or a text
            run's empty prompt); default: told by the labels' shape (``ByShape``).
        noise_scale: the objective's noise scale (the initial noise is ``N(0, noise_scale²)``).
        decode: network space → pixels in ``[-1, 1]`` (identity for pixel data).
        autocast: context for the network calls (e.g. the run's bf16 autocast).
        routes: the network's ``models.routing.RouteSampler`` (None without token routing);
            needed by ``guidance="sparse"``.
    """

    net: Callable[..., Tensor]
    velocity: ToVelocity
    shape: tuple[int, int, int]
    num_classes: int
    noise_scale: float
    decode: Callable[[Tensor], Tensor]
    device: torch.device | str = "cpu"
    autocast: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext
    )
    routes: Any = None
    condition: Condition | None = None

    def __post_init__(self) -> None:
        if self.condition is None:
            self.condition = ByShape(self.num_classes)

    @torch.no_grad()
    def __call__(
        self,
        labels: Tensor,
        seed: int,
        *,
        steps: int = 50,
        solver: str = "heun",
        cfg_scale: float = 1.0,
        interval: tuple[float, float] = (0.1, 1.0),
        eta: float = 1.0,
        guidance: str = "cfg",
        sparse_ratio: float = 0.5,
        negative: Tensor | None = None,
    ) -> Tensor:
        """Decoded samples ``float [n, C, H, W]`` in ``[-1, 1]`` (on ``device``) for
        ``labels [n]`` (a text run: token ids ``[n, L]``); the initial noise (and the SDE's
        noise, ``solver="euler_maruyama"`` with ``eta``) is a function of ``seed`` alone.

        ``guidance``: ``cfg`` (classifier-free, scale ``cfg_scale``) or ``sparse`` (the full
        network guided by itself with ``sparse_ratio`` of the patch tokens routed,
        :class:`~denoiselab.sampling.guidance.SparseGuidance`; routes seeded by ``seed``).
        ``negative``: the unconditional branch's condition (a negative prompt's ids)."""
        noise = noise_for(seed, len(labels), self.shape, self.noise_scale, self.device)
        sde_noise = torch.Generator().manual_seed(sde_seed(seed))
        labels = labels.to(self.device)
        if guidance == "cfg":
            fn: Callable[[Tensor, float], Tensor] = ClassifierFreeGuidance(
                self.net,
                self.velocity,
                labels,
                self.condition,
                cfg_scale,
                interval,
                y_null=None if negative is None else negative.to(self.device),
            )
        elif guidance == "sparse":
            if negative is not None:
                raise ValueError(
                    "a negative prompt replaces CFG's unconditional branch; guidance 'sparse' "
                    "has none (it guides the network by its routed self): use guidance 'cfg'"
                )
            fn = SparseGuidance(self.net, self.velocity, labels,
                                self._weak_routes(sparse_ratio, seed), cfg_scale, interval)  # fmt: skip
        else:
            raise ValueError(f"guidance={guidance!r}; valid: {', '.join(GUIDANCE)}")
        with self.autocast():
            x = sample(
                fn, noise, steps, solver, eta=eta, noise_scale=self.noise_scale,
                generator=sde_noise,
            )  # fmt: skip
        return self.decode(x.float()).float()

    def _weak_routes(self, ratio: float, seed: int) -> Callable[[int], Tensor]:
        """Routes for sparse guidance: this network's routing at ``ratio``, drawn from a
        generator seeded by ``seed`` (one draw per guided evaluation)."""
        if self.routes is None:
            raise ValueError(
                "guidance 'sparse' guides a network trained with token routing by its routed "
                "self; this network has model.routing.kind: none (use guidance 'cfg')"
            )
        n = self.routes.num_patches
        skipped = round(ratio * n) if 0 < ratio < 1 else 0
        if not 0 < ratio < 1 or skipped == 0:  # none routed: v_w = v_f, guidance would vanish
            raise ValueError(
                f"sparse_ratio={ratio!r} (--sparse-ratio) must lie in (0, 1) and route at least "
                f"one of the network's {n} patch tokens (more than {0.5 / n:.3g}); it is the fraction "
                "of patch tokens the weak pass routes"
            )
        weak = replace(self.routes, cfg=replace(self.routes.cfg, ratio=ratio))
        gen = torch.Generator(self.device).manual_seed(seed + 0x5EED)
        return lambda b: weak(b, gen, self.device)


def compile_for_sampling(net: nn.Module) -> Callable[..., Tensor]:
    """``torch.compile`` of ``net`` for sampling, with static shapes: the conditional batch
    ``[B]`` (outside the CFG interval) and the batched CFG pass ``[2B]`` each get their own
    graph instead of one slower dynamic-shape graph."""
    return torch.compile(net, dynamic=False)


def noise_for(
    seed: int, n: int, shape: tuple[int, ...], noise_scale: float, device: torch.device | str
) -> Tensor:
    """Deterministic initial noise ``[n, *shape]`` from ``seed`` (drawn on CPU, then moved,
    so the same seed gives the same images on every device)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g) * noise_scale).to(device)


def sde_seed(seed: int) -> int:
    """The SDE noise stream of sample seed ``seed``: apart from the initial noise's stream."""
    return (seed * 0x9E3779B97F4A7C15 + 0x5DE) % 2**63


def balanced_labels(n: int, num_classes: int, offset: int = 0) -> Tensor:
    """``[offset, offset+1, …] mod num_classes`` — every class equally often (JiT eval: 50 each)."""
    return (torch.arange(n) + offset) % num_classes
