"""Per-channel latent normalisation ``z_n = (z − shift) / scale``, applied when latents are loaded.

Caches store raw latents; the normalisation is chosen at load time (``data.latent_norm``), so
it can change without re-encoding. Sources of ``(shift, scale)``:

- FLUX.1-style ``AutoencoderKL``: ``shift = shift_factor``, ``scale = 1 / scaling_factor``
  (diffusers: ``(z − shift_factor) · scaling_factor``), broadcast to every channel;
- FLUX.2: the VAE's own BatchNorm running statistics on the folded 128 channels,
  ``shift = running_mean``, ``scale = sqrt(running_var + eps)`` (as JLT and diffusers do);
- the small denoiselab autoencoder: per-channel statistics measured after its training;
- ``dataset``: per-channel mean and std of the cached latents themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LatentNorm:
    """``shift`` and ``scale``: one float per latent channel (``scale > 0``)."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shift) != len(self.scale) or not self.shift:
            raise ValueError(
                f"LatentNorm: shift has {len(self.shift)} and scale {len(self.scale)} channels; "
                "they must match and be non-empty"
            )
        bad = [s for s in self.scale if not (math.isfinite(s) and s > 0)]
        if bad or not all(math.isfinite(s) for s in self.shift):
            raise ValueError(
                f"LatentNorm: scales must be finite and > 0 (got {bad[:4]}), shifts finite"
            )

    @classmethod
    def identity(cls, channels: int) -> LatentNorm:
        return cls((0.0,) * channels, (1.0,) * channels)

    @classmethod
    def from_values(
        cls,
        shift: Sequence[float] | Tensor | float,
        scale: Sequence[float] | Tensor | float,
        channels: int,
    ) -> LatentNorm:
        """Scalars are broadcast to ``channels``; tensors/sequences must have ``channels`` items."""

        def vec(v: Sequence[float] | Tensor | float, name: str) -> tuple[float, ...]:
            values = torch.as_tensor(v, dtype=torch.float64).flatten()
            if values.numel() == 1:
                values = values.expand(channels)
            if values.numel() != channels:
                raise ValueError(
                    f"LatentNorm: {name} has {values.numel()} values, expected {channels}"
                )
            return tuple(values.tolist())

        return cls(vec(shift, "shift"), vec(scale, "scale"))

    @property
    def channels(self) -> int:
        return len(self.shift)

    def _vectors(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.shape[-3] != self.channels:
            raise ValueError(
                f"LatentNorm has {self.channels} channels but the latent has shape {tuple(z.shape)}"
            )
        shape = (self.channels, 1, 1)
        shift = torch.tensor(self.shift, dtype=z.dtype, device=z.device).view(shape)
        scale = torch.tensor(self.scale, dtype=z.dtype, device=z.device).view(shape)
        return shift, scale

    def normalize(self, z: Tensor) -> Tensor:
        """Raw ``[..., C, h, w]`` → normalised (what the diffusion model sees)."""
        shift, scale = self._vectors(z)
        return (z - shift) / scale

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised ``[..., C, h, w]`` → raw (what the decoder takes)."""
        shift, scale = self._vectors(z)
        return z * scale + shift

    def to_json(self) -> dict[str, list[float]]:
        return {"shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_json(cls, data: dict[str, Sequence[float]]) -> LatentNorm:
        return cls(tuple(float(v) for v in data["shift"]), tuple(float(v) for v in data["scale"]))
