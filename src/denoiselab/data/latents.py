"""``latents``: a cache written by ``denoiselab cache-latents``, read as a dataset of latents.

``ds[i] -> (latent float32 [c, h, w], label)``, normalised at load time with the
normalisation chosen by ``data.latent_norm`` (the cache stores raw latents). ``channels`` and
``image_size`` report the **latent** channel count and side, so the model is built for the
latents; the pixel size and channels the cache was encoded from must match ``data.image_size``
and ``data.channels``. With ``hflip`` the stored encoding of the mirrored image is used
(mirroring a latent is not the latent of the mirrored image), decided by ``(seed, i, epoch)``
exactly like the pixel datasets, so index ``i`` in epoch ``e`` is the encoding of what the
pixel dataset would have returned.

A cache written with ``--teacher`` also stores a frozen teacher's patch features of the
original pixels (and of the mirror); after ``request_extras(("teacher",))`` items are
``(latent, label, {"teacher": float32 [N_t, D_t]})``, the features of the same flip variant.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, SupportsIndex

import torch
from safetensors import safe_open
from torch import Tensor

from denoiselab.data.base import ImageDataset, flip_decision
from denoiselab.latents.manifest import CacheManifest, LatentCacheError, read_manifest


class LatentDataset(ImageDataset):
    """Cached latents under ``root``; shards are memory-mapped lazily, once per process."""

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        channels: int = 3,
        seed: int = 0,
        hflip: bool | None = None,
        latent_norm: str = "autoencoder",
    ) -> None:
        self.root = Path(root)
        m = self.manifest = read_manifest(root)
        where = f"latent cache {str(root)!r}"
        if image_size != m.image_size or channels != m.image_channels:
            raise LatentCacheError(
                f"data.image_size={image_size}, data.channels={channels} but the {where} was "
                f"encoded from {m.image_size}×{m.image_size}×{m.image_channels} images; set "
                f"data.image_size={m.image_size} and data.channels={m.image_channels}"
            )
        self.hflip = m.source_hflip if hflip is None else hflip
        if self.hflip and not m.flips:
            raise LatentCacheError(
                f"data.hflip=true but the {where} has no flipped encodings "
                "(cached with --no-flips); set data.hflip=false or re-cache with flips"
            )
        self.norm = m.norm(latent_norm)
        self.channels, self.image_size = m.latent_shape[0], m.latent_shape[1]
        self.num_classes, self.class_names, self.seed = m.num_classes, m.class_names, seed
        self._starts = [s.start for s in m.shards]
        self._labels = self._read_labels(m)
        self._handles: dict[int, Any] = {}

    def _read_labels(self, m: CacheManifest) -> list[int]:
        labels: list[int] = []
        for k, shard in enumerate(m.shards):
            with self._open(k, shard.file) as f:
                shape = tuple(f.get_slice("latents").get_shape())
                shard_labels = f.get_tensor("labels").tolist()
            if shape != (shard.count, *m.latent_shape) or shard.start != len(labels):
                raise LatentCacheError(
                    f"latent cache {str(self.root)!r}: {shard.file} holds latents of shape "
                    f"{shape} at index {shard.start}; the manifest expects "
                    f"{(shard.count, *m.latent_shape)} at index {len(labels)}"
                )
            labels += shard_labels
        if len(labels) != m.num_images:
            raise LatentCacheError(
                f"latent cache {str(self.root)!r}: shards hold {len(labels)} latents, "
                f"manifest says {m.num_images}"
            )
        return labels

    def _open(self, k: int, name: str) -> Any:
        path = self.root / name
        if not path.is_file():
            raise LatentCacheError(f"latent cache {str(self.root)!r}: shard {name} is missing")
        return safe_open(path, framework="pt")

    def __getstate__(self) -> dict[str, Any]:  # open handles do not cross process boundaries
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self._labels)

    def raw(self, index: int, flipped: bool = False, what: str = "latents") -> Tensor:
        """The stored (un-normalised) latent ``float32 [c, h, w]`` of sample ``index``
        (``what="teacher"``: its teacher features ``[N_t, D_t]``)."""
        k = bisect.bisect_right(self._starts, index) - 1
        if k not in self._handles:
            self._handles[k] = self._open(k, self.manifest.shards[k].file)
        name = f"{what}_flip" if flipped else what
        return self._handles[k].get_slice(name)[index - self._starts[k]].float()

    def available_extras(self) -> tuple[str, ...]:
        return ("teacher",) if self.manifest.teacher is not None else ()

    def _load(self, index: int) -> tuple[Tensor, int]:
        return self.norm.normalize(self.raw(index)), self._labels[index]

    def get_item(self, index: SupportsIndex, epoch: int = 0) -> tuple[Any, ...]:
        """Normalised latent of sample ``index`` as seen in ``epoch`` (flip variant chosen),
        its label and, if requested, the extras of the same variant."""
        i = self._check_index(index)
        flipped = self.hflip and flip_decision(self.seed, i, epoch)
        item = self.norm.normalize(self.raw(i, flipped)), self._labels[i]
        if not self.extras:
            return item
        return (*item, {name: self.raw(i, flipped, name) for name in self.extras})

    def labels(self) -> torch.Tensor:
        """All labels ``int64 [N]``."""
        return torch.tensor(self._labels, dtype=torch.long)
