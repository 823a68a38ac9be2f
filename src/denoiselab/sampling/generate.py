"""Generate images from a network: noise → Heun/Euler ODE with CFG interval → x̂ at t = 1."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from denoiselab.sampling.guidance import ClassifierFreeGuidance, ToVelocity
from denoiselab.sampling.solvers import sample


@torch.no_grad()
def generate(
    net: Callable[..., Tensor],
    to_velocity: ToVelocity,
    labels: Tensor,
    noise: Tensor,
    *,
    null_class: int,
    steps: int = 50,
    solver: str = "heun",
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.1, 1.0),
) -> Tensor:
    """Samples ``[B, C, H, W]`` for class ``labels [B]`` from ``noise`` (already × noise_scale).

    ``noise`` fixes the randomness: the same noise and labels give the same images.
    """
    fn = ClassifierFreeGuidance(net, to_velocity, labels, null_class, cfg_scale, interval)
    return sample(fn, noise, steps, solver)


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


def balanced_labels(n: int, num_classes: int, offset: int = 0) -> Tensor:
    """``[offset, offset+1, …] mod num_classes`` — every class equally often (JiT eval: 50 each)."""
    return (torch.arange(n) + offset) % num_classes
