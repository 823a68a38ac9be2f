"""``DataConfig``: which dataset, at which resolution, and ``build_dataset(cfg)``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from denoiselab.data.base import ImageDataset
from denoiselab.data.digits import DigitsDataset
from denoiselab.data.imagefolder import ImageFolderDataset, folder_class_names
from denoiselab.data.latents import LatentDataset
from denoiselab.data.prepared import PreparedDataset
from denoiselab.data.shapes import EASY_SHAPES, SHAPE_NAMES, TEXTURES, ShapesDataset
from denoiselab.data.shapes_caption import parse_pair

DatasetName = Literal["shapes", "digits", "imagefolder", "prepared", "latents"]
Difficulty = Literal["hard", "easy"]
LatentNormName = Literal["autoencoder", "dataset", "none"]
NEEDS_ROOT = ("imagefolder", "prepared", "latents")
ROOT_KINDS = {
    "imagefolder": "image folder",
    "prepared": "prepared (`denoiselab prepare-data --out`)",
    "latents": "latent cache",
}
# read from files by ``num_workers: auto`` workers; the others render or map in memory
FILE_DATASETS = ("imagefolder", "prepared")
AUTO_WORKERS_MAX = 8
IMAGE_SIZE_RANGE = (8, 1024)
# hflip=None picks the dataset's default: on for photos (as JiT on ImageNet), off for the
# built-ins (mirrored digits are not digits; shapes are already drawn at random angles).
# ``latents``: None = as the source dataset of the cache (recorded in its manifest).
DEFAULT_HFLIP = {"shapes": False, "digits": False, "imagefolder": True, "prepared": True}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    """Dataset choice and preprocessing.

    Attributes:
        name: ``"shapes"`` (procedural, the default), ``"digits"`` (sklearn 8×8 digits) or
            ``"imagefolder"`` (``root/<class>/*.jpg`` photos, JiT preprocessing) or
            ``"prepared"`` (an imagefolder's centre crops written once as uint8 shards by
            ``denoiselab prepare-data``: the same images, no decoding) or
            ``"latents"`` (a cache written by ``denoiselab cache-latents``; the model then
            sees latents: the dataset reports the latent channels and side).
        image_size: side of the square images in pixels (``latents``: of the encoded images,
            checked against the cache).
        root: the class-folder tree (``imagefolder``), the prepared folder (``prepared``) or
            the latent cache (``latents``).
        num_images: length of ``shapes`` (defines the epoch); ignored by the others.
        seed: dataset seed: shapes content and flip decisions (not the batch order).
        channels: 3 (RGB) or 1 (grey) (``latents``: of the encoded images, checked).
        hflip: random horizontal flips; ``None`` = dataset default (``DEFAULT_HFLIP``;
            ``latents``: the cache's source default, using the cached flipped encodings).
        num_workers: DataLoader worker processes per rank (0 = load in the training
            process); ``"auto"`` (the default): ``min(8, CPU cores per rank)`` for data read
            from files (``imagefolder``, ``prepared``), 0 for the others (rendered or
            memory-mapped: workers would cost more than they save).
        prefetch_factor: batches each worker prepares ahead (with workers > 0).
        cache: keep every loaded sample in memory (float32, ``4·C·H·W`` bytes each, per
            worker) so that later epochs skip decoding/rendering; for small data sets.
        latent_norm: ``latents`` only: ``"autoencoder"`` (its own scaling/shift or BatchNorm
            statistics), ``"dataset"`` (per-channel statistics of the cache) or ``"none"``.
        textures: ``shapes`` only: the background textures drawn (default all of
            ``plain, stripes, checker, dots, gradient``); a subset makes an easier data set
            with the same shapes, colours and labels.
        difficulty: ``shapes`` only: ``"hard"`` (the default: 8 classes at random angles,
            sizes and places on five textures) or ``"easy"`` (5 distinct classes, upright,
            large, centred, on plain or gradient backgrounds; ``denoiselab.data.shapes``).
        holdout_pairs: ``shapes`` only: ``"<colour> <shape>"`` combinations (e.g.
            ``["red triangle"]``) that never appear in the data (their images are re-coloured,
            every other image is unchanged), so a compositional score can ask for them
            (:mod:`denoiselab.metrics.compositional`); ``None`` (the default) holds none out.
        autoencoder: ``latents`` only: where the autoencoder recorded in the cache lives now,
            for decoding (default: the path recorded at caching; its fingerprint must match).
    """

    name: DatasetName = "shapes"
    image_size: int = 32
    root: str | None = None
    num_images: int = 50_000
    seed: int = 0
    channels: int = 3
    hflip: bool | None = None
    num_workers: int | Literal["auto"] = "auto"
    prefetch_factor: int = 2
    cache: bool = False
    latent_norm: LatentNormName = "autoencoder"
    autoencoder: str | None = None
    textures: tuple[str, ...] | None = None
    difficulty: Difficulty = "hard"
    holdout_pairs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        names = get_args(DatasetName)
        if self.name not in names:
            raise ValueError(f"data.name={self.name!r}; valid: {', '.join(map(repr, names))}")
        lo, hi = IMAGE_SIZE_RANGE
        if not (_is_int(self.image_size) and lo <= self.image_size <= hi):
            raise ValueError(f"data.image_size={self.image_size!r}; valid: integers {lo} … {hi}")
        if self.name in NEEDS_ROOT and not self.root:
            what = ROOT_KINDS[self.name]
            raise ValueError(f"data.root={self.root!r}; {self.name!r} needs the {what} directory")
        if self.name not in NEEDS_ROOT and self.root is not None:
            raise ValueError(
                f"data.root={self.root!r} is only used by "
                f"{', '.join(map(repr, NEEDS_ROOT))}, not {self.name!r}"
            )
        self._check_latent_fields()
        self._check_shapes_fields()
        if not (_is_int(self.num_images) and self.num_images >= 1):
            raise ValueError(f"data.num_images={self.num_images!r}; valid: integers ≥ 1")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"data.seed={self.seed!r}; valid: integers ≥ 0")
        if self.channels not in (1, 3) or not _is_int(self.channels):
            raise ValueError(f"data.channels={self.channels!r}; valid: 1, 3")
        if self.hflip not in (None, True, False):
            raise ValueError(
                f"data.hflip={self.hflip!r}; valid: None (dataset default), True, False"
            )
        if self.num_workers != "auto" and not (_is_int(self.num_workers) and self.num_workers >= 0):
            raise ValueError(f"data.num_workers={self.num_workers!r}; valid: 'auto', integers ≥ 0")
        if not (_is_int(self.prefetch_factor) and self.prefetch_factor >= 1):
            raise ValueError(f"data.prefetch_factor={self.prefetch_factor!r}; valid: integers ≥ 1")
        if not isinstance(self.cache, bool):
            raise ValueError(f"data.cache={self.cache!r}; valid: true, false")
        if self.cache and self.name == "latents":
            raise ValueError(
                "data.cache=True is for decoded/rendered images; 'latents' already reads "
                "a memory-mapped cache"
            )

    def _check_latent_fields(self) -> None:
        norms = get_args(LatentNormName)
        if self.latent_norm not in norms:
            raise ValueError(f"data.latent_norm={self.latent_norm!r}; valid: {norms}")
        if self.name != "latents" and (self.latent_norm != "autoencoder" or self.autoencoder):
            raise ValueError(
                f"data.latent_norm={self.latent_norm!r}, data.autoencoder={self.autoencoder!r} "
                f"are only used by 'latents', not {self.name!r}"
            )

    def _check_shapes_fields(self) -> None:
        levels = get_args(Difficulty)
        if self.difficulty not in levels:
            raise ValueError(
                f"data.difficulty={self.difficulty!r}; valid: {', '.join(map(repr, levels))}"
            )
        if self.name != "shapes" and (self.difficulty != "hard" or self.textures):
            raise ValueError(
                f"data.difficulty={self.difficulty!r}, data.textures={self.textures!r} are "
                f"only used by 'shapes', not {self.name!r}"
            )
        if self.holdout_pairs is not None:
            if self.name != "shapes":
                raise ValueError(
                    f"data.holdout_pairs={list(self.holdout_pairs)!r} is only used by 'shapes', "
                    f"not {self.name!r}"
                )
            shapes = tuple(EASY_SHAPES if self.difficulty == "easy" else SHAPE_NAMES)
            for pair in self.holdout_pairs:
                try:
                    parse_pair(pair, shapes)
                except ValueError as err:
                    raise ValueError(f"data.holdout_pairs: {err}") from None
        unknown = [t for t in self.textures or () if t not in TEXTURES]
        if unknown:
            raise ValueError(
                f"data.textures has {unknown!r}; valid: {', '.join(TEXTURES)} (a subset)"
            )
        if self.textures is not None and not self.textures:
            raise ValueError(
                "data.textures=[] draws no background; list some of "
                f"{', '.join(TEXTURES)}, or null for all"
            )
        if self.difficulty == "easy" and self.textures:
            raise ValueError(
                f"data.textures={list(self.textures)!r} applies to difficulty 'hard'; "
                "'easy' draws its own plain or gradient backgrounds"
            )

    @property
    def resolved_num_workers(self) -> int:
        """``num_workers`` with ``"auto"`` replaced (see the class docstring)."""
        if self.num_workers != "auto":
            return self.num_workers
        return min(AUTO_WORKERS_MAX, cores_per_rank()) if self.name in FILE_DATASETS else 0

    @property
    def resolved_hflip(self) -> bool:
        """``hflip`` with ``None`` replaced by the dataset's default (``latents``: the
        dataset resolves ``None`` from its cache; this property then says ``False``)."""
        return DEFAULT_HFLIP.get(self.name, False) if self.hflip is None else self.hflip


def class_names(cfg: DataConfig) -> list[str] | None:
    """``class_names[label]`` of the data ``cfg`` describes, without loading any image, or
    ``None`` where they cannot be read here (an image folder or cache that is not on this
    machine)."""
    if cfg.name in ("shapes", "digits"):
        return list(_build_dataset(cfg).class_names)  # both are cheap to construct
    root = Path(cfg.root or "")
    if cfg.name == "latents":
        from denoiselab.latents.manifest import LatentCacheError, read_manifest

        try:
            return list(read_manifest(root).class_names)
        except LatentCacheError:
            return None
    if cfg.name == "prepared":
        return list(_build_dataset(cfg).class_names) if root.is_dir() else None  # memory-mapped
    return folder_class_names(root) if root.is_dir() else None


def cores_per_rank() -> int:
    """CPU cores this process may use, divided among the ranks of its node (torchrun's
    ``LOCAL_WORLD_SIZE``)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (usable or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def build_dataset(cfg: DataConfig) -> ImageDataset:
    """The dataset described by ``cfg`` (imagefolder raises if ``root`` is missing or empty)."""
    dataset = _build_dataset(cfg)
    dataset.cache = cfg.cache
    return dataset


def _build_dataset(cfg: DataConfig) -> ImageDataset:
    common = {"image_size": cfg.image_size, "channels": cfg.channels, "seed": cfg.seed}
    if cfg.name == "shapes":
        return ShapesDataset(
            num_images=cfg.num_images,
            hflip=cfg.resolved_hflip,
            textures=cfg.textures,
            difficulty=cfg.difficulty,
            holdout_pairs=cfg.holdout_pairs,
            **common,
        )
    if cfg.name == "digits":
        return DigitsDataset(hflip=cfg.resolved_hflip, **common)
    assert cfg.root is not None  # checked in DataConfig.__post_init__
    if cfg.name == "latents":
        return LatentDataset(cfg.root, hflip=cfg.hflip, latent_norm=cfg.latent_norm, **common)
    if cfg.name == "prepared":
        return PreparedDataset(cfg.root, hflip=cfg.resolved_hflip, **common)
    return ImageFolderDataset(cfg.root, hflip=cfg.resolved_hflip, **common)
