"""The latent cache format: ``manifest.json`` plus sharded safetensors.

```
<cache>/manifest.json             written last (atomically): its presence means complete
<cache>/shard_00000.safetensors   latents [n, c, h, w], latents_flip [n, c, h, w], labels int64 [n]
                                  caption_bytes uint8, caption_offsets int64 [n + 1]
                                  (shapes) caption_flip_bytes, caption_flip_offsets
                                  (optional) teacher [n, N_t, D_t], teacher_flip [n, N_t, D_t]
```

Latents are stored **raw** (un-normalised; ``latents_flip`` is the encoding of the mirrored
image). The manifest records the encoder's identity (kind, path, fingerprint of its files),
both candidate normalisations (``autoencoder``: the AE's own; ``dataset``: per-channel
statistics of this cache over both flip variants) and the source data, so that training
chooses the normalisation at load time and sampling decodes with the same autoencoder.
``teacher`` (optional) identifies the frozen image encoder whose patch features of the
original pixels (and of their mirror) are stored beside the latents, for REPA on latents
(``kind``, ``weights_id``, ``resolution``, ``grid``, ``dim``, ``name``).
``captions`` (absent in caches written before captions were stored) says where the shards'
captions came from (:mod:`denoiselab.latents.captions`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from denoiselab.config import ConfigError
from denoiselab.io import atomic_write_text
from denoiselab.latents.norm import LatentNorm

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""dtypes a cache may store its floating tensors in (``--dtype``)."""

MANIFEST = "manifest.json"
CACHE_FORMAT = "denoiselab-latents"
CACHE_VERSION = 1
NormName = Literal["autoencoder", "dataset", "none"]


class LatentCacheError(ConfigError):
    """A latent cache is missing, incomplete or inconsistent; the message names the path.

    A ``ConfigError``: the CLI reports it as ``error: …`` (``data.root`` points at it)."""


@dataclass(frozen=True)
class EncoderRecord:
    """Which autoencoder made the latents: enough to find it again and check it is the same."""

    kind: str
    path: str | None
    fingerprint: str
    image_channels: int
    latent_channels: int
    downsample: int


@dataclass(frozen=True)
class ShardRecord:
    file: str
    start: int
    count: int


@dataclass(frozen=True)
class CacheManifest:
    """Everything a reader needs; ``latent_shape = (c, h, w)`` of one stored latent."""

    encoder: EncoderRecord
    image_size: int
    image_channels: int
    latent_shape: tuple[int, int, int]
    num_images: int
    num_classes: int
    class_names: list[str]
    flips: bool
    source_hflip: bool
    source: dict[str, Any]
    normalization: dict[str, LatentNorm]
    shards: list[ShardRecord]
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None
    captions: dict[str, Any] | None = None

    def norm(self, name: str) -> LatentNorm:
        """The normalisation called ``name`` (``"none"`` = identity)."""
        if name == "none":
            return LatentNorm.identity(self.latent_shape[0])
        if name not in self.normalization:
            valid = ", ".join(repr(n) for n in get_args(NormName))
            raise LatentCacheError(f"latent_norm={name!r}; valid: {valid}")
        return self.normalization[name]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["normalization"] = {k: v.to_json() for k, v in self.normalization.items()}
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheManifest:
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        return cls(
            **{
                **data,
                "encoder": EncoderRecord(**data["encoder"]),
                "latent_shape": tuple(data["latent_shape"]),
                "normalization": {
                    k: LatentNorm.from_json(v) for k, v in data["normalization"].items()
                },
                "shards": [ShardRecord(**s) for s in data["shards"]],
            }
        )


def read_manifest(root: str | Path) -> CacheManifest:
    """The manifest of the cache at ``root``, with clear errors when it is not a complete cache."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        problem = "does not exist" if not Path(root).exists() else f"has no {MANIFEST}"
        raise LatentCacheError(
            f"latent cache {str(root)!r} {problem}; create it with "
            "`denoiselab cache-latents CONFIG --out DIR` (an interrupted run leaves no manifest)"
        )
    data = json.loads(path.read_text())
    if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        raise LatentCacheError(
            f"{str(path)!r} is not a {CACHE_FORMAT!r} v{CACHE_VERSION} manifest "
            f"(format={data.get('format')!r}, version={data.get('version')!r})"
        )
    try:
        return CacheManifest.from_json(data)
    except (KeyError, TypeError) as e:
        raise LatentCacheError(f"{str(path)!r}: malformed manifest ({e})") from e


def write_manifest(root: str | Path, manifest: CacheManifest) -> Path:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename)."""
    return atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest.to_json(), indent=1))
