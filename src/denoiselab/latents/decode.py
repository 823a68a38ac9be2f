"""``decoder_for(data_cfg, device)``: the map from the model's data space to ``[-1, 1]`` pixels.

Pixel datasets decode with the identity. A ``latents`` dataset decodes with the autoencoder
recorded in its cache (or ``data.autoencoder``, which must have the recorded fingerprint),
after undoing the normalisation chosen by ``data.latent_norm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from denoiselab.latents.autoencoders import Autoencoder, fingerprint, load_autoencoder
from denoiselab.latents.manifest import CacheManifest, LatentCacheError, read_manifest
from denoiselab.latents.norm import LatentNorm

Decoder = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def autoencoder_for_cache(
    manifest: CacheManifest, path: str | None = None, device: torch.device | str = "cpu"
) -> Autoencoder:
    """Load the autoencoder that wrote ``manifest`` (from ``path`` if given) and check it."""
    rec = manifest.encoder
    where = path or rec.path or "identity"
    if rec.kind != "identity":
        try:
            found = fingerprint(where)
        except FileNotFoundError as e:
            raise LatentCacheError(
                f"{e}. The latents were encoded by the {rec.kind} autoencoder at {rec.path!r}; "
                "set data.autoencoder to where it lives now"
            ) from e
        if found != rec.fingerprint:
            raise LatentCacheError(
                f"the latents were encoded by the {rec.kind} autoencoder with fingerprint "
                f"{rec.fingerprint} (at {rec.path!r}), but {where!r} has fingerprint {found}; "
                "point data.autoencoder at the original autoencoder or re-cache"
            )
    ae = load_autoencoder(where, rec.kind, device=device, image_channels=rec.image_channels)
    if (ae.latent_channels, ae.downsample) != (rec.latent_channels, rec.downsample):
        raise LatentCacheError(
            f"{where!r} gives {ae.latent_channels} channels at downsample {ae.downsample}; "
            f"the cache recorded {rec.latent_channels} at {rec.downsample}"
        )
    return ae


class LatentDecoder:
    """``z [B, c, h, w]`` (normalised) → pixels ``float32 [B, C, H, W]`` clamped to ``[-1, 1]``.

    Decodes in chunks of ``batch`` so large sample grids fit in memory.
    """

    def __init__(self, ae: Autoencoder, norm: LatentNorm, batch: int = 64) -> None:
        self.ae, self.norm, self.batch = ae, norm, batch

    @torch.no_grad()
    def __call__(self, z: Tensor) -> Tensor:
        out = [self.ae.decode(self.norm.denormalize(c.float())) for c in z.split(self.batch)]
        return torch.cat(out).to(z.device).clamp(-1, 1)


def differentiable_decoder(data_cfg: Any, device: torch.device | str = "cpu") -> Decoder:
    """Like :func:`decoder_for`, but differentiable in its input and unclamped: the identity
    for pixel data; for ``latents`` the cache's frozen autoencoder decoding ``denormalize(z)``
    with its graph kept (a loss on decoded pixels trains the network through it)."""
    if getattr(data_cfg, "name", None) != "latents":
        return _identity
    manifest = read_manifest(data_cfg.root)
    ae = autoencoder_for_cache(manifest, data_cfg.autoencoder, device)
    norm = manifest.norm(data_cfg.latent_norm)
    return lambda z: ae.decode_with_grad(norm.denormalize(z.float())).to(z.device)


def pixel_data_config(data_cfg: Any) -> Any:
    """The pixel ``DataConfig`` whose images the model's samples are compared with.

    Pixel datasets: ``data_cfg`` itself. ``latents``: the source dataset recorded in the cache
    (metrics need real pixel images as reference, not latents).
    """
    if getattr(data_cfg, "name", None) != "latents":
        return data_cfg
    from denoiselab.config import from_dict
    from denoiselab.data import DataConfig

    return from_dict(DataConfig, read_manifest(data_cfg.root).source, "data")


def decoder_for(data_cfg: Any, device: torch.device | str = "cpu") -> Decoder:
    """What turns the model's data space back into ``[-1, 1]`` pixels for grids and metrics.

    Pixel datasets decode with the identity; ``latents`` with the cache's autoencoder.
    """
    if getattr(data_cfg, "name", None) != "latents":
        return _identity
    manifest = read_manifest(data_cfg.root)
    ae = autoencoder_for_cache(manifest, data_cfg.autoencoder, device)
    return LatentDecoder(ae, manifest.norm(data_cfg.latent_norm))
