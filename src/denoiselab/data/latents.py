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

``caption(i, epoch)`` is the caption the pixel dataset gave image ``i`` (stored in the cache;
for ``shapes``, that of the flip variant ``get_item(i, epoch)`` returns), so a text run trains
on latents exactly as on pixels. Images cached without a caption are counted
(``missing_captions``) and warned about once, as the imagefolder does.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import Any, SupportsIndex

import torch
from safetensors import safe_open
from torch import Tensor

from denoiselab.data.base import ImageDataset, flip_decision
from denoiselab.latents import captions as cap
from denoiselab.latents.manifest import CacheManifest, LatentCacheError, read_manifest

log = logging.getLogger(__name__)


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
        self._offsets: dict[str, list[Tensor]] = {name: [] for name in cap.NAMES}
        self._labels = self._read_labels(m)
        self._handles: dict[int, Any] = {}
        record = m.captions or {}
        self.captions_follow_flips = bool(record.get("follow_flips", False))
        self.caption_source = record.get("source")
        self.missing_captions = int(record.get("missing", 0))
        if self.missing_captions:
            log.warning(
                "%s: %d of %d cached images have no caption; their caption is empty",
                where, self.missing_captions, m.num_images,
            )  # fmt: skip

    def _read_labels(self, m: CacheManifest) -> list[int]:
        labels: list[int] = []
        for k, shard in enumerate(m.shards):
            with self._open(k, shard.file) as f:
                shape = tuple(f.get_slice("latents").get_shape())
                shard_labels = f.get_tensor("labels").tolist()
                for name in cap.NAMES if m.captions else ():
                    if f"{name}_offsets" in f.keys():  # noqa: SIM118 - not a mapping
                        self._offsets[name].append(f.get_tensor(f"{name}_offsets"))
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
        name = f"{what}_flip" if flipped else what
        return self._handle(k).get_slice(name)[index - self._starts[k]].float()

    def _handle(self, k: int) -> Any:
        if k not in self._handles:
            self._handles[k] = self._open(k, self.manifest.shards[k].file)
        return self._handles[k]

    def caption_variant(self, index: SupportsIndex, mirrored: bool) -> str:
        """The stored caption of image ``index`` (``mirrored``: of its mirror, which differs
        only where captions follow flips)."""
        i = self._check_index(index)
        if self.manifest.captions is None:
            raise LatentCacheError(
                f"latent cache {str(self.root)!r} stores no captions (written before "
                "cache-latents stored them): a text run needs them; re-run `denoiselab "
                "cache-latents` into a new directory"
            )
        name = "caption_flip" if mirrored and self.captions_follow_flips else "caption"
        k = bisect.bisect_right(self._starts, i) - 1
        return cap.read_one(self._handle(k), self._offsets[name][k], i - self._starts[k], name)

    def caption(self, index: SupportsIndex, epoch: int | None = None) -> str:
        """The caption of image ``index`` as ``get_item(index, epoch)`` shows it (module doc)."""
        return self.caption_variant(index, self.mirrored(index, epoch))

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

    def label(self, index: SupportsIndex) -> int:
        return self._labels[self._check_index(index)]

    def labels(self) -> torch.Tensor:
        """All labels ``int64 [N]``."""
        return torch.tensor(self._labels, dtype=torch.long)
