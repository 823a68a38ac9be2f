"""Eager-mode fast paths of JiT's elementwise layers: the same maths in fewer memory passes.

In eager PyTorch every elementwise op is one pass over memory, and autograd adds as many
again (often with broadcast gradients that do not vectorise). On the small CPU models
(JiT-T/4: 64–72 tokens × 192 wide) these passes are a good part of the step beside the
matrix products. Under ``torch.compile`` the layers keep their plain formulas (inductor
fuses them itself).

- :func:`rms_norm`: RMSNorm with a hand-written backward (no stride-0 broadcast gradients,
  no ``pow`` backward); the forward is bit-identical to the plain formula.
- :func:`rope_complex`: the pairwise RoPE rotation as one complex multiplication (one pass
  forward and one backward, instead of flip + 2 products + sum and their gradients).

Measured on JiT-T/4, batch 64, 1 thread, forward + backward (CPU time, 2-core AVX2 machine):
the hand-written RMSNorm backward ~5 % and the complex RoPE ~8 % off the network's time
(``BENCHMARKS.md``, issue #21).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _RMSNorm(torch.autograd.Function):
    """``y = w ⊙ x̂``, ``x̂ = x·r``, ``r = (mean(x²) + ε)^(−½)`` over the last dim, in float32.

    Backward (D = last dim, g = ∂L/∂y):
        ∂L/∂w = Σ_rows g ⊙ x̂
        ∂L/∂x = r · (g⊙w − x̂ · mean(g⊙w⊙x̂))
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        x32 = x.float()
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x32 * r
        ctx.save_for_backward(xhat, r, weight)
        ctx.x_dtype = x.dtype
        return (weight * xhat).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        xhat, r, weight = ctx.saved_tensors
        g = grad.float()
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * xhat).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gxw = g * weight
            dot = (gxw * xhat).mean(-1, keepdim=True)
            gx = (torch.addcmul(gxw, xhat, dot, value=-1.0) * r).to(ctx.x_dtype)
        return gx, gw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x [..., D]`` with gain ``weight [D]``, computed in float32, returned in
    ``x.dtype``; the output equals ``weight · x·rsqrt(mean(x²) + eps)`` bit for bit."""
    return _RMSNorm.apply(x, weight, eps)


def complex_rope_applies(x: Tensor) -> bool:
    """Whether :func:`rope_complex` is used for ``x [B, H, N, head_dim]``: float32 on the
    CPU, eager, with pairs adjacent in memory. ``head_dim % 32 == 0`` keeps every row in
    whole SIMD vectors (AVX2 and AVX-512 handle 8 or 16 complex numbers per step), where the
    complex product matches the pairwise formula bit for bit; the scalar remainder loop
    may use fused multiply-adds and so round differently."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[-1] % 32 == 0
        and x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s in x.stride()[:-1])
    )


def rope_complex(x: Tensor, cos_half: Tensor, sin_half: Tensor) -> Tensor:
    """Rotate pairs ``(x[2k], x[2k+1])`` by angles with cosines/sines ``[N, head_dim/2]``:
    ``(x₀ + i·x₁)·(cos + i·sin)``, i.e. ``(x₀cos − x₁sin, x₀sin + x₁cos)``.
    x: [..., N, head_dim] -> same shape."""
    rot = torch.complex(cos_half, sin_half)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2)
