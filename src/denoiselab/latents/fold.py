"""Space-to-channel folding of latents (FLUX.2 / JLT: 32×(H/8)×(W/8) → 128×(H/16)×(W/16)).

``fold(z, p)[b, c·p² + i·p + j, y, x] = z[b, c, p·y + i, p·x + j]`` — the channel order of
diffusers' ``Flux2Pipeline._patchify_latents``, which is the order of the FLUX.2 VAE's
BatchNorm running statistics. ``unfold`` is its exact inverse (a pure permutation).
"""

from __future__ import annotations

from torch import Tensor


def fold(z: Tensor, p: int = 2) -> Tensor:
    """``[B, C, H, W]`` → ``[B, C·p², H/p, W/p]`` (each p×p block becomes p² channels)."""
    b, c, h, w = z.shape
    if h % p or w % p:
        raise ValueError(f"fold: latent size {h}×{w} is not divisible by the patch size {p}")
    z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * p * p, h // p, w // p)


def unfold(z: Tensor, p: int = 2) -> Tensor:
    """``[B, C·p², h, w]`` → ``[B, C, h·p, w·p]``; the inverse of :func:`fold`."""
    b, cp, h, w = z.shape
    if cp % (p * p):
        raise ValueError(f"unfold: {cp} channels is not a multiple of p² = {p * p}")
    z = z.reshape(b, cp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, cp // (p * p), h * p, w * p)
