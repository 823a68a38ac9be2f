"""Building blocks of the JiT network (seeds/003 §4.1, §4.4, Appendix A).

Everything here is a plain ``nn.Module`` or a pure function of tensors. Derived tables
(RoPE angles, the fixed sin-cos position embedding) are non-persistent buffers created on
the device that is current when the module is built (so ``with torch.device("meta")``
builds a weightless model), and follow ``module.to(device)`` afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import attention, complex_rope_applies, rms_norm, rope_complex, swiglu


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (§4.4); computed in float32.

    x: [..., dim] -> [..., dim]
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            return rms_norm(x, self.weight, self.eps)  # same output, a cheaper backward
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (§4.4): ``w3(silu(x W1) * (x W2))``.

    The hidden width is ``int(2/3 · int(mlp_ratio · dim))`` so that the three matrices hold
    about as many weights as a 2-matrix MLP of ratio ``mlp_ratio``. ``dropout`` acts on the
    hidden activation (Appendix A: dropout inside the MLP of the middle blocks).
    x: [B, N, dim] -> [B, N, dim]
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x12 = self.w12(x)
        if torch.compiler.is_compiling():
            x1, x2 = x12.chunk(2, dim=-1)
            return self.w3(self.drop(F.silu(x1) * x2))
        return self.w3(self.drop(swiglu(x12)))  # same output, a cheaper backward


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of :class:`SwiGLU` (shared with the FLOP counter)."""
    return int(int(dim * mlp_ratio) * 2 / 3)


# --------------------------------------------------------------------------- RoPE (§4.4)


def axial_rope_angles(rows: Tensor, cols: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles of axial 2-D RoPE for tokens at grid positions ``(rows, cols)``.

    The first half of ``head_dim`` rotates with the row index, the second half with the
    column index; each half holds ``head_dim/4`` channel pairs with frequencies
    ``theta^(-2k / (head_dim/2))``. rows, cols: [N] (any real values) -> angles [N, head_dim/2],
    one angle per channel pair.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"axial RoPE needs head_dim divisible by 4, got head_dim={head_dim}")
    axis_dim = head_dim // 2
    exponent = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=rows.device) / axis_dim
    freqs = theta**-exponent  # [head_dim/4]
    ang_r = rows.double()[:, None] * freqs[None]
    ang_c = cols.double()[:, None] * freqs[None]
    return torch.cat([ang_r, ang_c], dim=-1).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs ``(x[2k], x[2k+1])`` by the angle whose cos/sin are given.

    x: [B, H, N, head_dim]; cos, sin: [N, head_dim/2] -> [B, H, N, head_dim].
    """
    x_pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2)


def pair_swap_matrix(dim: int) -> Tensor:
    """The symmetric permutation matrix S [dim, dim] with ``(x @ S)[2k] = x[2k + 1]`` and
    ``(x @ S)[2k + 1] = x[2k]``: it swaps each adjacent channel pair, exactly."""
    idx = torch.arange(dim)
    swap = torch.zeros(dim, dim)
    swap[idx, idx ^ 1] = 1.0
    return swap


class AxialRoPE(nn.Module):
    """Axial 2-D RoPE tables for a ``grid × grid`` patch sequence with ``num_prefix`` extra
    tokens in front (the in-context class tokens).

    As in the official JiT code, prefix tokens get the identity rotation (cos = 1, sin = 0):
    they carry no position through RoPE, only through their learned position embedding.

    The tables are built once, full width, as non-persistent buffers [num_prefix + grid²,
    head_dim]: ``cos`` holds each pair's cosine twice, ``sin`` holds ``(−sin, +sin)``, and
    the rotation is ``x·cos + swap_pairs(x)·sin``, equal to :func:`apply_rope` bit for bit.
    In float32 on the CPU the rotation is one complex product
    (:func:`~denoiselab.models.fused.rope_complex`, ~4× faster forward + backward than the
    index form), an opaque operator also under ``torch.compile``: traced, its pair swap was
    either strided indexing (inductor then fused the qk-norm weight gradient into a scalar
    reduction, ~16 % of a compiled JiT-T/4 step) or an exact matmul with
    :func:`pair_swap_matrix` (~3 %). Elsewhere eager mode keeps the index form, so the
    model's dense-op FLOPs stay exactly those that ``forward_macs`` counts, and compiled code
    the matmul.
    """

    def __init__(self, head_dim: int, grid: int, num_prefix: int = 0) -> None:
        super().__init__()
        idx = torch.arange(grid * grid)
        angles = axial_rope_angles(idx // grid, idx % grid, head_dim)  # row-major patch order
        prefix = angles.new_zeros(num_prefix, head_dim // 2)
        angles = torch.cat([prefix, angles], dim=0)
        sin = angles.sin()
        self.register_buffer("cos", angles.cos().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("sin", torch.stack([-sin, sin], dim=-1).flatten(-2), persistent=False)
        self.register_buffer("swap", pair_swap_matrix(head_dim), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, heads, N, head_dim] with N == num_prefix + grid² -> same shape."""
        return self.rotate(x, self.cos, self.sin)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x·cos + swap_pairs(x)·sin`` for tables laid out like ``self.cos``/``self.sin``
        (rows of them, e.g. gathered per sample as [B, 1, N′, head_dim] by token routing)."""
        if complex_rope_applies(x):
            return rope_complex(x, cos[..., ::2], sin[..., 1::2])
        if torch.compiler.is_compiling():
            swapped = F.linear(x, self.swap.to(x.dtype))  # S is symmetric: x @ Sᵀ = x @ S
        else:
            swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head RMSNorm qk-norm and RoPE (§4.4).

    Uses :func:`~denoiselab.models.fused.attention` (SDPA, or the explicit product for few
    keys on the CPU); ``dropout`` acts on the output projection
    (Appendix A). x: [B, N, dim] -> [B, N, dim].
    """

    def __init__(
        self, dim: int, num_heads: int, *, qk_norm: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm: nn.Module = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, rope: AxialRoPE | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """``mask``: optional bool ``[B, 1, 1, N]``, True where a key may be attended
        (padding of text tokens is False)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        # split at dim 2, then transpose: the backward stacks the three gradients straight
        # into the [B, N, 3, heads, head_dim] layout of qkv (unbinding a permuted view would
        # stack them elsewhere and copy the whole gradient once more)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.drop(self.proj(out))


# --------------------------------------------------------------------------- adaLN-Zero


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x [B, N, D], shift/scale [B, D] -> ``x·(1+scale) + shift``
    (one fused multiply-add pass)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class AdaLNModulation(nn.Module):
    """``Linear(SiLU(c))`` producing ``chunks`` vectors of width D, zero-initialised
    (adaLN-Zero, DiT): at init every shift/scale/gate is 0. c: [B, D] -> chunks × [B, D].
    """

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.chunks, dim=-1)


# --------------------------------------------------------------------------- embeddings


class PatchEmbed(nn.Module):
    """Patchify and embed (§4.1, Fig. 4): ``p·p·C → d′ → D`` (bottleneck, no bias in the
    first, low-rank factor) or ``p·p·C → D`` when ``bottleneck`` is None.

    x: [B, C, H, W] -> tokens [B, (H/p)·(W/p), D] in row-major patch order.
    """

    def __init__(self, patch: int, in_channels: int, dim: int, bottleneck: int | None) -> None:
        super().__init__()
        first = dim if bottleneck is None else bottleneck
        self.proj1 = nn.Conv2d(in_channels, first, patch, stride=patch, bias=bottleneck is None)
        self.proj2: nn.Module = nn.Identity() if bottleneck is None else nn.Linear(bottleneck, dim)

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (xavier on the flattened kernel), biases 0."""
        w = self.proj1.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.proj1.bias is not None:
            nn.init.zeros_(self.proj1.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.proj1(x).flatten(2).transpose(1, 2))


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT style): [grid², dim], row-major.

    The first half of the channels encodes the column index, the second half the row index;
    each half is ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_k = 10000^(-k / (dim/4))``.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    idx = torch.arange(grid * grid, dtype=torch.float64)

    def axis(pos: Tensor) -> Tensor:
        ang = pos[:, None] * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    return torch.cat([axis(idx % grid), axis(idx // grid)], dim=-1).float()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of a real time ``t`` [B] -> [B, dim] as ``[cos, sin]``.

    t is used as given (t ∈ [0, 1], t = 1 is data), like the official JiT code.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: sinusoidal features followed by ``Linear → SiLU → Linear``."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def reset_parameters(self) -> None:
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class ClassEmbedder(nn.Module):
    """Condition encoder for class labels: y [B] (long) -> [B, D].

    Row ``num_classes`` is the *null* class used by CFG and class dropout. This is the seam
    for other condition encoders (e.g. text): anything mapping a condition batch to [B, D]
    can be passed to ``JiT(cfg, cond_embedder=...)``.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)
