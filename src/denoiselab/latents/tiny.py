"""A small KL autoencoder that denoiselab trains itself (``denoiselab train-ae``), for offline CPU work.

Default: 32×32×3 images ↔ 4×8×8 latents (downsample 4, 12× fewer numbers), ≈0.2M parameters.
The first and last layers are 2×2 pixel (un)shuffles, so no convolution runs at full
resolution (the network is cheap enough to train in minutes on one CPU core).
A JiT with patch 1 on 8×8 latents has 64 tokens, like JiT-T/4 on 32×32 pixels.

Saved as a directory: ``model.safetensors`` (weights) and ``config.json`` (``format``,
architecture, per-channel latent statistics, training summary), each written atomically;
``config.json`` is written last, so its presence means the directory is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from denoiselab.io import atomic_write

TINY_FORMAT = "denoiselab-tiny-ae"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass(frozen=True)
class TinyAEConfig:
    """Architecture. Pixels are pixel-unshuffled by ``patch``; ``widths[k]`` is the channel
    count at resolution ``H / (patch · 2**k)``; the latent sits at the last level, so
    ``downsample = patch · 2 ** (len(widths) - 1)``."""

    image_channels: int = 3
    latent_channels: int = 4
    patch: int = 2
    widths: tuple[int, ...] = (32, 64)

    def __post_init__(self) -> None:
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels={self.image_channels!r}; valid: 1, 3")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels={self.latent_channels!r} must be >= 1")
        if not self.widths or any(w < 1 for w in self.widths) or self.patch < 1:
            raise ValueError(
                f"widths={self.widths!r}, patch={self.patch!r}: need ≥ 1 level of positive "
                "widths and patch ≥ 1"
            )

    @property
    def downsample(self) -> int:
        return self.patch * 2 ** (len(self.widths) - 1)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))))))`` at constant width."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class TinyAE(nn.Module):
    """Conv encoder → diagonal Gaussian ``(mean, logvar)`` ``[B, c, H/f, W/f]`` → conv decoder."""

    def __init__(self, cfg: TinyAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, c, p = cfg.widths, cfg.latent_channels, cfg.patch
        pixels = cfg.image_channels * p * p
        enc: list[nn.Module] = [nn.PixelUnshuffle(p), nn.Conv2d(pixels, w[0], 3, padding=1)]
        for a, b in pairwise(w):
            enc += [ResBlock(a), nn.Conv2d(a, b, 3, stride=2, padding=1)]
        enc += [ResBlock(w[-1]), nn.GroupNorm(_groups(w[-1]), w[-1]), nn.SiLU()]
        enc += [nn.Conv2d(w[-1], 2 * c, 3, padding=1)]
        dec: list[nn.Module] = [nn.Conv2d(c, w[-1], 3, padding=1), ResBlock(w[-1])]
        for a, b in zip(w[:0:-1], w[-2::-1]):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(a, b, 3, padding=1)]
            dec += [ResBlock(b)]
        dec += [nn.GroupNorm(_groups(w[0]), w[0]), nn.SiLU()]
        dec += [nn.Conv2d(w[0], pixels, 3, padding=1), nn.PixelShuffle(p)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, C, H, W]`` in ``[-1, 1]`` → ``(mean, logvar)``, each ``[B, c, H/f, W/f]``."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mode (mean): ``[B, c, H/f, W/f]``."""
        return self.moments(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """``[B, c, h, w]`` → pixels ``[B, C, h·f, w·f]`` (≈ ``[-1, 1]``, not clamped)."""
        return self.decoder(z)


def save_tiny_ae(
    net: TinyAE,
    directory: str | Path,
    *,
    latent_mean: Tensor,
    latent_std: Tensor,
    info: dict[str, Any],
) -> Path:
    """Write ``model.safetensors`` then ``config.json`` (each atomically) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda p: save_file(state, p))
    config = {
        "format": TINY_FORMAT,
        "version": 1,
        "arch": asdict(net.cfg),
        "latent_mean": [float(v) for v in latent_mean.flatten()],
        "latent_std": [float(v) for v in latent_std.flatten()],
        "info": info,
    }
    atomic_write(out / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))
    return out


def load_tiny_ae(directory: str | Path) -> tuple[TinyAE, dict[str, Any]]:
    """``(network in eval mode, config dict)`` from a directory written by :func:`save_tiny_ae`."""
    d = Path(directory)
    config = json.loads((d / CONFIG).read_text())
    if config.get("format") != TINY_FORMAT:
        raise ValueError(
            f"{str(d)!r} is not a denoiselab tiny autoencoder (format != {TINY_FORMAT!r})"
        )
    arch = dict(config["arch"], widths=tuple(config["arch"]["widths"]))
    net = TinyAE(TinyAEConfig(**arch))
    net.load_state_dict(load_file(d / WEIGHTS))
    return net.eval(), config
