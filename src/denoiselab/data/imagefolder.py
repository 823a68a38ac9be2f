"""``imagefolder``: a directory of class sub-folders (ImageNet layout), preprocessed as JiT does.

Layout: ``root/<class_name>/**/<file>.{jpg,jpeg,png,…}``; class names sorted alphabetically
give the label ids (as ``torchvision.datasets.ImageFolder``). For ImageNet, point ``root`` at
its ``train/`` folder. A root without class sub-folders whose images lie directly in it (the
usual layout of a captioned text-to-image set) is one class named after the folder.

Captions (:mod:`denoiselab.data.captions`): ``metadata.jsonl`` entries (``file_name`` +
``text``/``caption``) or sidecar ``.txt`` files beside the images. When the tree has any, an
image without one is counted in ``missing_captions`` (one warning at construction) and
captioned ``""``; a tree with none is captioned by class names, as before. Preprocessing follows the reference JiT training pipeline: the ADM
centre crop (:func:`center_crop_arr`), a random horizontal flip (here decided by
``(seed, index, epoch)``), then ``x / 255 · 2 − 1``.

Bad files never stop an epoch. Files in awkward modes are decoded correctly
(:mod:`denoiselab.data.decode`: 16-bit grey scaled, not clipped; transparency composited on
white; CMYK, palette, grey converted). Corrupt, truncated, zero-byte or undecodable files are
skipped: the sample is replaced by the next readable index (a pure function of the files, so
the batch of step ``s`` stays a pure function of ``(seed, s)`` and resuming stays exact); each
bad file is logged once (the first ``MAX_WARNINGS`` by name), and ``skipped`` / ``bad_paths``
count and name them (per process: a DataLoader worker keeps its own). Construction decodes
files until one is readable, so a folder with no readable image is an
:class:`ImageFolderError` before training starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import SupportsIndex

import numpy as np
from PIL import Image
from torch import Tensor

from denoiselab.config import ConfigError
from denoiselab.data.base import ImageDataset, uint8_to_model
from denoiselab.data.captions import index_captions
from denoiselab.data.decode import to_8bit

log = logging.getLogger(__name__)
MAX_WARNINGS = 10  # bad files named in the log; later ones are only counted

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderError(ConfigError):
    """An imagefolder that cannot be trained on: no class folders, a class folder without
    image files, not one readable image (a :class:`~denoiselab.config.ConfigError`: the
    ``data`` section points at bad data)."""


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop (Dhariwal & Nichol 2021), as used by JiT for ImageNet.

    1. Halve both sides with a BOX filter while the short side is ≥ ``2·image_size``
       (cheap, alias-free pre-shrinking of large photos).
    2. BICUBIC-resize so that the short side is ``image_size`` (sides rounded to nearest).
    3. Crop the central ``image_size × image_size`` square (offsets rounded down).
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(
        tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC
    )
    left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def class_folders(root: str | os.PathLike[str]) -> list[str]:
    """The class names of an ImageNet-style tree: its sub-folders, sorted; hidden folders
    (``.ipynb_checkpoints``, …) are not classes."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")


def decode_crop(path: str, image_size: int, channels: int) -> np.ndarray:
    """The file at ``path`` decoded (:mod:`~denoiselab.data.decode`) and centre-cropped
    (:func:`center_crop_arr`): ``uint8 [image_size, image_size, channels]``. Raises whatever
    the decoder raises for an unreadable file (``prepare-data`` decodes with this too)."""
    with Image.open(path) as file:
        file.load()  # decode now: a truncated file fails here
        image = to_8bit(file, channels)
    array = np.asarray(center_crop_arr(image, image_size))
    return array if array.ndim == 3 else array[..., None]


def find_images(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class_names, [(path, label), …])`` for an ImageNet-style tree; clear errors if empty."""
    root_path = Path(root)
    expected = "a directory with one sub-folder per class: root/<class_name>/*.jpg|png|…"
    if not root_path.is_dir():
        problem = "is not a directory" if root_path.exists() else "does not exist"
        raise FileNotFoundError(f"imagefolder root {str(root)!r} {problem}; expected {expected}")
    classes = class_folders(root_path)
    if not classes:
        flat = flat_images(root_path)
        if flat:
            return [root_path.resolve().name], [(path, 0) for path in flat]
        raise ImageFolderError(
            f"imagefolder root {str(root)!r} has no class sub-folders and no images; expected "
            f"{expected} (or images directly in root)"
        )
    per_class = {name: _files(root_path / name) for name in classes}
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        raise ImageFolderError(
            f"imagefolder root {str(root)!r}: class folders {empty} contain no files with "
            f"extensions {IMAGE_EXTENSIONS}; expected {expected}"
        )
    samples = [(path, label) for label, name in enumerate(classes) for path in per_class[name]]
    return classes, samples


def flat_images(root: Path) -> list[str]:
    """Image files directly in ``root`` (sorted): the one-class layout of captioned sets."""
    return sorted(
        os.path.join(root, e.name)
        for e in os.scandir(root)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def folder_class_names(root: str | os.PathLike[str]) -> list[str]:
    """Class names of ``root`` without reading images: its class folders, or the folder's own
    name for a flat folder of images (``[]`` if neither)."""
    root_path = Path(root)
    classes = class_folders(root_path)
    return classes or ([root_path.resolve().name] if flat_images(root_path) else [])


def _files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, sorted, extension matched case-insensitively)."""
    found = []
    for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
        found += [
            os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


class ImageFolderDataset(ImageDataset):
    """Images under ``root`` centre-cropped to ``image_size``, labelled by class folder."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 256,
        channels: int = 3,
        seed: int = 0,
        hflip: bool = True,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r}; valid: 1, 3")
        self.root = str(root)
        self.class_names, self.samples = find_images(root)
        self.num_classes = len(self.class_names)
        self.image_size, self.channels, self.seed, self.hflip = image_size, channels, seed, hflip
        self.skipped = 0  # unreadable files met so far (in this process)
        self.bad_paths: set[str] = set()
        self._last_error = ""
        self._load(0)  # a folder without one readable image fails here, not mid-epoch
        self._paths = [os.path.normpath(path) for path, _ in self.samples]
        self.captions = index_captions(self.root, self._paths)
        self.missing_captions = (
            0 if self.captions.empty else sum(not self.captions.has_caption(p) for p in self._paths)
        )
        if self.missing_captions:
            log.warning(
                "imagefolder %s: %d of %d images have no caption (no %s entry, no .txt beside "
                "them); their caption is empty",
                self.root, self.missing_captions, len(self._paths), "metadata.jsonl",
            )  # fmt: skip
        if self.captions.unmatched:
            log.warning(
                "imagefolder %s: %d metadata.jsonl entries name no image of the data set "
                "(first: %s)",
                self.root, len(self.captions.unmatched), self.captions.unmatched[0],
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.samples)):
            j = (index + offset) % len(self.samples)
            image = self._read(self.samples[j][0])
            if image is not None:
                return uint8_to_model(image), self.samples[j][1]
        raise ImageFolderError(
            f"imagefolder root {self.root!r}: none of its {len(self.samples)} image files could "
            f"be decoded (last: {self._last_error}); check the data"
        )

    def label(self, index: SupportsIndex) -> int:
        """The class folder of the image that ``self[index]`` shows (no decoding; like
        :meth:`caption`, it follows the files known to be unreadable in this process)."""
        return self.samples[self._readable(self._check_index(index))][1]

    def _readable(self, i: int) -> int:
        """``i``, or the next index whose file is not known to be unreadable."""
        for offset in range(len(self.samples)):
            j = (i + offset) % len(self.samples)
            if self.samples[j][0] not in self.bad_paths:
                return j
        return i

    def _read(self, path: str) -> np.ndarray | None:
        """Decoded, cropped ``uint8 [H, W, C]``, or ``None`` (counted, warned) if unreadable."""
        if path in self.bad_paths:
            return None
        try:
            return decode_crop(path, self.image_size, self.channels)
        except Exception as err:  # any decoder error (PIL raises many types): skip, never crash
            self.bad_paths.add(path)
            self.skipped += 1
            self._last_error = f"{path}: {err}"
            if self.skipped <= MAX_WARNINGS:
                more = "; later ones are only counted (.skipped, .bad_paths)"
                log.warning(
                    "imagefolder: skipping unreadable image %s (%s); %d skipped so far%s",
                    path, err, self.skipped, more if self.skipped == MAX_WARNINGS else "",
                )  # fmt: skip
            return None

    @property
    def caption_source(self) -> str:
        """``"files"`` (metadata.jsonl / sidecar .txt) or ``"class names"``."""
        return "class names" if self.captions.empty else "files"

    def caption(self, index: SupportsIndex, epoch: int | None = None) -> str:
        """The caption of the image that ``self[index]`` shows: from ``metadata.jsonl`` or its
        ``.txt`` sidecar (``""`` if it has neither), or, in a tree without caption files, the
        class folder name with underscores as spaces (e.g. ``"golden retriever"``).

        An unreadable file is replaced by the next readable one (module docstring); the
        caption follows the files known to be unreadable in this process, so ask after
        loading the item. ``epoch`` is ignored (a caption file describes the photo, flipped
        or not)."""
        j = self._readable(self._check_index(index))
        if self.captions.empty:
            return self.class_names[self.samples[j][1]].replace("_", " ")
        return self.captions.caption(self._paths[j])
