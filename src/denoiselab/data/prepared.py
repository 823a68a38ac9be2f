"""``prepared``: an imagefolder's centre crops, decoded once into memory-mapped uint8 shards.

``denoiselab prepare-data SRC --out DIR --image-size S`` (:mod:`denoiselab.data.prepare`)
writes, for the ``N`` image files of ``SRC`` (the imagefolder's order and labels):

- ``images-<k>.npy``: ``uint8 [n_k, S, S, C]``, the ``M`` readable images in file order, each
  exactly what ``imagefolder`` yields for it (same decoding, same ADM centre crop);
- ``labels.npy``: ``int64 [M]``, their labels;
- ``index.npy``: ``int64 [N]``, for each file index ``i`` the stored image the imagefolder
  yields at ``i`` — itself, or for an unreadable file the next readable one (cyclically), as
  ``imagefolder`` replaces a bad file — so the dataset has the folder's length and
  ``ds[i]`` equals the folder's ``ds[i]``, flips included: the flip of index ``i`` in epoch
  ``e`` is ``flip_decision(seed, i, epoch)`` in both;
- ``captions.json`` (only where the folder has caption files: ``metadata.jsonl`` or sidecar
  ``.txt``, :mod:`denoiselab.data.captions`): ``[M]`` strings, the caption of each stored
  image as the imagefolder reads it (``""`` for an image without one), so a text run on the
  prepared folder sees the folder's captions; without it the class names are the captions;
- ``manifest.json``, written last: settings, shard sizes and SHA-256 hashes, the bad files,
  and a content hash over all of it (the folder is complete once it exists).

Training on the prepared folder therefore equals training on the image folder, step for
step, with no JPEG decoding (reads are page-cache or disk bound: ``S² · C`` bytes per
image). Shards are memory-mapped lazily, once per process (numpy memory maps with pickles
refused).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, SupportsIndex

import numpy as np
from torch import Tensor

from denoiselab.config import ConfigError
from denoiselab.data.base import ImageDataset, uint8_to_model

FORMAT = "denoiselab-prepared-1"
MANIFEST = "manifest.json"
CAPTIONS = "captions.json"


class PreparedDataError(ConfigError):
    """A prepared folder that is missing, incomplete, or made for other settings."""


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a complete prepared folder (named errors otherwise)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        problem = "does not exist" if not root.exists() else f"has no {MANIFEST}"
        raise PreparedDataError(
            f"prepared data {str(root)!r} {problem}: write it with `denoiselab prepare-data "
            f"IMAGE_FOLDER --out {root} --image-size S` (an interrupted run resumes)"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise PreparedDataError(f"prepared data {str(root)!r}: unreadable manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise PreparedDataError(
            f"prepared data {str(root)!r}: format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    return manifest


def is_prepared(root: str | Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


class PreparedDataset(ImageDataset):
    """Images of a prepared folder; ``len`` and items equal the source imagefolder's."""

    def __init__(
        self,
        root: str | Path,
        image_size: int = 256,
        channels: int = 3,
        seed: int = 0,
        hflip: bool = True,
    ) -> None:
        self.root = Path(root)
        m = self.manifest = read_manifest(root)
        if (image_size, channels) != (m["image_size"], m["channels"]):
            raise PreparedDataError(
                f"data.image_size={image_size}, data.channels={channels} but {str(root)!r} holds "
                f"{m['image_size']}×{m['image_size']}×{m['channels']} crops; set "
                f"data.image_size={m['image_size']} and data.channels={m['channels']} (or "
                "prepare the data again at this size)"
            )
        self.image_size, self.channels, self.seed, self.hflip = image_size, channels, seed, hflip
        self.class_names = list(m["class_names"])
        self.num_classes = len(self.class_names)
        self.content_hash = m["content_hash"]
        counts = [s["count"] for s in m["shards"]]
        self._starts = list(np.cumsum([0, *counts[:-1]]))
        self._files = [self.root / s["file"] for s in m["shards"]]
        self._index = np.load(self.root / "index.npy", allow_pickle=False)
        self._labels = np.load(self.root / "labels.npy", allow_pickle=False)
        if len(self._index) != m["num_files"] or len(self._labels) != m["num_images"]:
            raise PreparedDataError(f"prepared data {str(root)!r}: index or labels are cut")
        self._maps: dict[int, np.ndarray] = {}
        self._captions: list[str] | None = None
        if "captions_sha256" in m:
            self._captions = json.loads((self.root / CAPTIONS).read_text())
            if len(self._captions) != m["num_images"]:
                raise PreparedDataError(f"prepared data {str(root)!r}: {CAPTIONS} is cut")
        self.caption_source = "class names" if self._captions is None else "files"
        self.missing_captions = int(m.get("missing_captions", 0))

    def __len__(self) -> int:
        return len(self._index)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # each process maps the shards itself (no copy through pickling)
        return state

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self._files[k], mmap_mode="r", allow_pickle=False)
        return self._maps[k]

    def stored(self, position: int) -> np.ndarray:
        """Stored image ``position`` (of ``M``): ``uint8 [S, S, C]`` (a memory-mapped view)."""
        k = bisect.bisect_right(self._starts, position) - 1
        return self._shard(k)[position - self._starts[k]]

    def _load(self, index: int) -> tuple[Tensor, int]:
        position = int(self._index[index])
        return uint8_to_model(np.asarray(self.stored(position))), int(self._labels[position])

    def label(self, index: SupportsIndex) -> int:
        return int(self._labels[int(self._index[self._check_index(index)])])

    def caption(self, index: SupportsIndex, epoch: int | None = None) -> str:
        """The caption the imagefolder gives ``index``: from the folder's caption files (stored
        in ``captions.json``), else the class folder name with underscores as spaces.
        ``epoch`` is ignored (a caption file describes the photo, flipped or not)."""
        position = int(self._index[self._check_index(index)])
        if self._captions is not None:
            return self._captions[position]
        return self.class_names[int(self._labels[position])].replace("_", " ")
