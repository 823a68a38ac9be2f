"""Latent spaces behind one autoencoder interface (identity for pixels).

- :mod:`.autoencoders`: ``Autoencoder`` (``encode``/``decode``/``normalization``) and
  ``load_autoencoder(path)`` for ``identity``, ``tiny`` (trained by ``denoiselab train-ae``),
  diffusers ``AutoencoderKL`` (FLUX.1-style) and ``AutoencoderKLFlux2`` (folded to 128 ch).
- :mod:`.cache`: ``denoiselab cache-latents`` — sharded safetensors of raw latents with flips.
- :mod:`.decode`: ``decoder_for(data_cfg, device)`` — model space → pixels for grids/metrics;
  ``pixel_data_config(data_cfg)`` — the real pixel data metrics compare samples with.
- :mod:`.train_ae`: ``denoiselab train-ae`` — the small offline autoencoder.

The latent dataset itself is ``denoiselab.data.LatentDataset`` (``data.name: latents``).
"""

from __future__ import annotations

from denoiselab.latents.autoencoders import (
    Autoencoder,
    AutoencoderKind,
    DiffusersKLAutoencoder,
    Flux2Autoencoder,
    IdentityAutoencoder,
    TinyAutoencoder,
    detect_kind,
    fingerprint,
    load_autoencoder,
)
from denoiselab.latents.decode import (
    Decoder,
    LatentDecoder,
    autoencoder_for_cache,
    decoder_for,
    differentiable_decoder,
    pixel_data_config,
)
from denoiselab.latents.fold import fold, unfold
from denoiselab.latents.manifest import (
    CacheManifest,
    EncoderRecord,
    LatentCacheError,
    read_manifest,
)
from denoiselab.latents.norm import LatentNorm
from denoiselab.latents.tiny import TinyAE, TinyAEConfig, load_tiny_ae, save_tiny_ae


def cache_latents_main(argv: list[str] | None = None) -> int:
    """``denoiselab cache-latents CONFIG --out DIR [--autoencoder PATH] …`` (see ``-h``)."""
    from denoiselab.latents.cache import cache_latents_main as main

    return main(argv)


def train_ae_main(argv: list[str] | None = None) -> int:
    """``denoiselab train-ae [CONFIG] --out DIR [--steps N] …`` (see ``-h``)."""
    from denoiselab.latents.train_ae import train_ae_main as main

    return main(argv)


__all__ = [
    "Autoencoder",
    "AutoencoderKind",
    "CacheManifest",
    "Decoder",
    "DiffusersKLAutoencoder",
    "EncoderRecord",
    "Flux2Autoencoder",
    "IdentityAutoencoder",
    "LatentCacheError",
    "LatentDecoder",
    "LatentNorm",
    "TinyAE",
    "TinyAEConfig",
    "TinyAutoencoder",
    "autoencoder_for_cache",
    "cache_latents_main",
    "decoder_for",
    "detect_kind",
    "differentiable_decoder",
    "fingerprint",
    "fold",
    "load_autoencoder",
    "load_tiny_ae",
    "pixel_data_config",
    "read_manifest",
    "save_tiny_ae",
    "train_ae_main",
    "unfold",
]
