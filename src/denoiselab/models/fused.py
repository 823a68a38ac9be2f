"""Fast paths of JiT's layers: the same maths in fewer memory passes or a faster kernel.

In eager PyTorch every elementwise op is one pass over memory, and autograd adds as many
again (often with broadcast gradients that do not vectorise). On the small CPU models
(JiT-T/4: 64–72 tokens × 192 wide) these passes are a good part of the step beside the
matrix products. Under ``torch.compile`` RMSNorm and SwiGLU keep their plain formulas
(inductor fuses them itself); RoPE's complex product and the explicit attention are custom
operators, opaque to inductor, used in both modes.

- :func:`rms_norm`: RMSNorm with a hand-written backward (no stride-0 broadcast gradients,
  no ``pow`` backward); the forward is bit-identical to the plain formula.
- :func:`swiglu`: ``silu(x₁)·x₂`` with a backward that writes both halves' gradients into
  one tensor instead of concatenating them.
- :func:`rope_complex`: the pairwise RoPE rotation as one complex multiplication (one pass
  forward and one backward, instead of flip + 2 products + sum and their gradients).
- :func:`attention`: ``softmax(q·kᵀ/√d)·v`` as two batched matrix products around a softmax
  when the keys are few (:data:`SHORT_KEYS`) on the CPU in float32, where SDPA's flash kernel
  (which ``torch.compile`` also substitutes for the explicit formula) is the slower one.

Measured on JiT-T/4, batch 64, 1 thread, forward + backward (CPU time, 2-core AVX2 machine):
the hand-written RMSNorm backward ~5 % and the complex RoPE ~8 % off the network's time
(``BENCHMARKS.md``, issue #21).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class _SwiGLU(torch.autograd.Function):
    """``h = silu(x₁) ⊙ x₂`` for ``x₁₂ = [x₁ | x₂]`` (the halves of the last dim).

    Backward (g = ∂L/∂h), written straight into the two halves of one gradient, where
    autograd of ``chunk`` would compute them apart and concatenate them in one more pass:
        ∂L/∂x₂ = g ⊙ silu(x₁),   ∂L/∂x₁ = silu′(x₁) ⊙ (g ⊙ x₂)
    """

    @staticmethod
    def forward(ctx, x12: Tensor) -> Tensor:  # type: ignore[override]
        x1, x2 = x12.chunk(2, dim=-1)
        act = F.silu(x1)
        ctx.save_for_backward(x12, act)
        return act * x2

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        x12, act = ctx.saved_tensors
        x1, x2 = x12.chunk(2, dim=-1)
        grad12 = torch.empty_like(x12)
        g1, g2 = grad12.chunk(2, dim=-1)
        torch.mul(grad, act, out=g2)
        torch.ops.aten.silu_backward.grad_input(grad * x2, x1, grad_input=g1)
        return grad12


def swiglu(x12: Tensor) -> Tensor:
    """``silu(x₁) ⊙ x₂`` of the halves of ``x12 [..., 2H]`` -> [..., H], with a backward
    that writes both halves' gradients into one tensor (no concatenation)."""
    return _SwiGLU.apply(x12)


def complex_rope_applies(x: Tensor) -> bool:
    """Whether :func:`rope_complex` is used for ``x [B, H, N, head_dim]``: float32 on the
    CPU. ``head_dim % 32 == 0`` keeps every row in whole SIMD vectors (AVX2 and AVX-512
    handle 8 or 16 complex numbers per step), where the complex product matches the pairwise
    formula bit for bit; the scalar remainder loop may use fused multiply-adds and so round
    differently."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] % 32 == 0


def _pairs_viewable(x: Tensor) -> bool:
    """Whether adjacent channel pairs of ``x`` can be viewed as complex numbers in place."""
    return (
        x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s in x.stride()[:-1])
    )


def rope_complex(x: Tensor, cos_half: Tensor, sin_half: Tensor) -> Tensor:
    """Rotate pairs ``(x[2k], x[2k+1])`` by angles with cosines/sines ``[N, head_dim/2]``
    (or any shape that broadcasts against ``x``'s pairs): ``(x₀ + i·x₁)·(cos + i·sin)``,
    i.e. ``(x₀cos − x₁sin, x₀sin + x₁cos)``. x: [..., N, head_dim] -> same shape, contiguous.

    An opaque operator with its own backward (rotation by the opposite angle), so that under
    ``torch.compile`` it stays one complex product instead of a traced pair swap."""
    return _rope_rotate(x, cos_half, sin_half)


def _rotate_pairs(x: Tensor, cos_half: Tensor, sin_half: Tensor) -> Tensor:
    if not _pairs_viewable(x):
        x = x.clone(memory_format=torch.contiguous_format)
    # contiguous, whatever x's layout (e.g. q split from a fused qkv projection, heads
    # interleaved): the attention's batched products then take it without a copy
    out = x.new_empty(x.shape)
    torch.mul(
        torch.view_as_complex(x.unflatten(-1, (-1, 2))),
        torch.complex(cos_half, sin_half),
        out=torch.view_as_complex(out.unflatten(-1, (-1, 2))),
    )
    return out


@torch.library.custom_op("denoiselab::rope_rotate", mutates_args=())
def _rope_rotate(x: Tensor, cos_half: Tensor, sin_half: Tensor) -> Tensor:
    return _rotate_pairs(x, cos_half, sin_half)


@_rope_rotate.register_fake
def _(x: Tensor, cos_half: Tensor, sin_half: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def _rope_rotate_grad(ctx, grad: Tensor):
    cos_half, sin_half = ctx.saved_tensors
    return _rope_rotate(grad, cos_half, -sin_half), None, None  # R(θ)ᵀ = R(−θ)


def _setup_rope_rotate(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


_rope_rotate.register_autograd(_rope_rotate_grad, setup_context=_setup_rope_rotate)


# --------------------------------------------------------------------------- attention

SHORT_KEYS = 128
"""Most keys for which :func:`attention` takes the explicit product on the CPU. Forward +
backward of one JiT-T/4 attention (batch 64, 3 heads of 64; 2 threads, AVX-512), ms
(``benchmarks/attention_kernels.py``, BENCHMARKS.md):

    keys             64     72     96    128    160    192    256    576
    SDPA (flash)   12.2   13.4   18.6   28.3   42.8   51.5   84.7    420
    explicit       10.1    9.9   14.8   28.1   43.1   62.7    151    781

Beyond ~150 keys the N×N score matrix leaves the cache and the tiled flash kernel wins."""


def explicit_attention_applies(q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`attention` uses the explicit product: unmasked, float32, on the CPU,
    at most :data:`SHORT_KEYS` keys."""
    return (
        mask is None
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and k.shape[-2] <= SHORT_KEYS
    )


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q·kᵀ/√d + mask)·v`` over heads: q [B, H, N, d], k, v [B, H, M, d] -> [B, H, N, d];
    ``mask``: bool broadcastable to [B, H, N, M], True where a key may be attended.

    SDPA in general; the explicit product (:func:`_short_attention`, an opaque operator, so
    that inductor does not pattern-match it back into SDPA) where
    :func:`explicit_attention_applies`. Both compute the same function (to float rounding)."""
    if explicit_attention_applies(q, k, mask):
        # v split from a fused qkv projection has batch strides that no batched product can
        # take: one copy here, instead of one in the forward product and one in the backward.
        return _short_attention(q, k, v.contiguous())[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.library.custom_op("denoiselab::short_attention", mutates_args=())
def _short_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(out, probs)``; the probabilities [B, H, N, M] are kept for the backward."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    probs = scores.softmax(-1)
    return torch.matmul(probs, v), probs


@_short_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty((*q.shape[:-1], k.shape[-2]))


@torch.library.custom_op("denoiselab::short_attention_backward", mutates_args=())
def _short_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """With P = probs, g = ∂L/∂out, s = 1/√d:
    ∂L/∂v = Pᵀ·g,   ∂L/∂P = g·vᵀ,   ∂L/∂S = P ⊙ (∂L/∂P − rowsum(∂L/∂P ⊙ P)),
    ∂L/∂q = s·∂L/∂S·k,   ∂L/∂k = s·(∂L/∂S)ᵀ·q."""
    grad_v = torch.matmul(probs.transpose(-2, -1), grad)
    grad_p = torch.matmul(grad, v.transpose(-2, -1))
    grad_s = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype)
    grad_s.mul_(q.shape[-1] ** -0.5)
    return torch.matmul(grad_s, k), torch.matmul(grad_s.transpose(-2, -1), q), grad_v


@_short_attention_backward.register_fake
def _(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


def _setup_short_attention(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output[1])


def _short_attention_grad(ctx, grad_out: Tensor, _grad_probs: Tensor | None):
    q, k, v, probs = ctx.saved_tensors
    return _short_attention_backward(grad_out.contiguous(), q, k, v, probs)


_short_attention.register_autograd(_short_attention_grad, setup_context=_setup_short_attention)
