"""Frozen image encoders ("teachers") behind one interface, chosen by a config.

``build_teacher(TeacherConfig, pixel_data_cfg, device)`` returns an
:class:`~denoiselab.encoders.base.ImageEncoder`: ``[-1, 1]`` images → patch features
``[B, N_t, D_t]`` on ``encoder.grid``; preprocessing (resize, mean/std) is the encoder's.

Kinds (``teacher.kind``):

- ``offline`` (default): a small ViT trained label-free (SimCLR) on the run's own pixel data
  and cached (:mod:`.offline`, :mod:`.ssl`); no download, a couple of CPU minutes once.
- ``dinov2`` (with or without registers, any size), ``dinov3``, ``clip``, ``siglip``:
  transformers vision towers from a local directory ``teacher.path`` (:mod:`.hf`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from denoiselab.config import ConfigError, from_dict
from denoiselab.encoders.base import ImageEncoder
from denoiselab.encoders.hf import HF_FAMILIES, legacy_dir_id, load_hf_encoder, weights_fingerprint
from denoiselab.encoders.offline import load_offline_teacher, teacher_key
from denoiselab.encoders.ssl import SSLConfig

TeacherKind = Literal["offline", "dinov2", "dinov3", "clip", "siglip"]
SOURCES = {
    "dinov2": "e.g. `huggingface-cli download facebook/dinov2-with-registers-base --local-dir DIR`",
    "dinov3": "e.g. `huggingface-cli download facebook/dinov3-vitb16-pretrain-lvd1689m "
    "--local-dir DIR` (needs a transformers with DINOv3ViTModel)",
    "clip": "e.g. `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`",
    "siglip": "e.g. `huggingface-cli download google/siglip-base-patch16-224 --local-dir DIR`",
}


@dataclass(frozen=True)
class TeacherConfig:
    """Which frozen encoder provides the targets.

    kind: ``offline`` (trained here, cached) or a transformers family (see module doc).
    path: the local model directory (``config.json`` + safetensors) of a transformers kind.
    resolution: the side images are resized to before a transformers encoder; ``None``: the
        caller's choice (REPA: the student's grid × the teacher's patch, so the grids match
        as in REPA and PRX), else the encoder's default (DINOv2/v3: 224, CLIP/SigLIP: their
        own). The offline teacher always runs at the side of the data it was trained on.
    offline: :class:`~denoiselab.encoders.ssl.SSLConfig` overrides of the offline teacher.
    cache_dir: where the offline teacher is cached (default: the denoiselab cache root).
    """

    kind: TeacherKind = "offline"
    path: str | None = None
    resolution: int | None = None
    offline: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(TeacherKind):
            raise ConfigError(f"teacher.kind={self.kind!r}; valid: {get_args(TeacherKind)}")
        if self.kind == "offline" and self.path is not None:
            raise ConfigError("teacher.path is for transformers teachers; kind 'offline' has none")
        if self.kind != "offline" and self.offline:
            raise ConfigError(f"teacher.offline only configures kind 'offline', not {self.kind!r}")
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"teacher.resolution={self.resolution!r} must be >= 1")
        self.ssl_config()

    def ssl_config(self) -> SSLConfig:
        return from_dict(SSLConfig, self.offline, "teacher.offline")


def _require_dir(cfg: TeacherConfig, key: str) -> Path:
    if cfg.path is None:
        raise ConfigError(
            f"{key}.path is not set: the {cfg.kind} teacher loads from a local directory "
            f"(no download); {SOURCES[cfg.kind]}"
        )
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        problem = "does not exist" if not path.exists() else "has no config.json"
        raise ConfigError(
            f"{key}.path={cfg.path!r} {problem}; it must be a local {cfg.kind} model directory, "
            f"{SOURCES[cfg.kind]}"
        )
    return path


def build_teacher(
    cfg: TeacherConfig,
    pixel_data: Any,
    device: torch.device | str = "cpu",
    *,
    grid: int | None = None,
    key: str = "teacher",
    log: Any = None,
) -> ImageEncoder:
    """The frozen teacher of ``cfg`` on ``device``. ``pixel_data``: the pixel ``DataConfig``
    the offline teacher trains on; ``grid``: when ``cfg.resolution`` is unset, a
    transformers teacher gets ``grid × patch`` pixels, i.e. a ``grid × grid`` token grid;
    ``key`` names the config section in errors.

    The global (CPU) RNG is left as it was: what a run initialises after its teacher must not
    depend on whether the teacher was trained, loaded from the cache or built by transformers.
    """
    with torch.random.fork_rng(devices=[]):
        return _build_teacher(cfg, pixel_data, device, grid, key, log)


def _build_teacher(
    cfg: TeacherConfig,
    pixel_data: Any,
    device: torch.device | str,
    grid: int | None,
    key: str,
    log: Any,
) -> ImageEncoder:
    if cfg.kind == "offline":  # learned positions: it runs at the side it was trained at
        teacher: ImageEncoder = load_offline_teacher(
            pixel_data, cfg.ssl_config(), cache_dir=cfg.cache_dir, device=device, log=log
        )
        if cfg.resolution not in (None, teacher.resolution):
            raise ConfigError(
                f"{key}.resolution={cfg.resolution}: the offline teacher runs at the data's "
                f"side {teacher.resolution}; leave it unset"
            )
        return teacher
    path = _require_dir(cfg, key)
    return load_hf_encoder(cfg.kind, path, cfg.resolution, key, ConfigError, grid).to(device)


def teacher_dim(cfg: TeacherConfig, key: str = "teacher") -> int:
    """``D_t`` of the teacher of ``cfg``, read without loading weights (offline: its width;
    transformers: ``hidden_size`` of its (vision) config)."""
    if cfg.kind == "offline":
        return cfg.ssl_config().width
    config = json.loads((_require_dir(cfg, key) / "config.json").read_text())
    return int(config.get("vision_config", config)["hidden_size"])


def teacher_weights_id(cfg: TeacherConfig, pixel_data: Any, key: str = "teacher") -> str:
    """The ``weights_id`` :func:`build_teacher` would give, without loading or training it."""
    if cfg.kind == "offline":
        return teacher_key(pixel_data, cfg.ssl_config())
    return weights_fingerprint(_require_dir(cfg, key))


def accepted_teacher_ids(cfg: TeacherConfig, pixel_data: Any, key: str = "teacher") -> set[str]:
    """The ``weights_id`` values under which features of this teacher may have been cached:
    :func:`teacher_weights_id`, and for a pretrained directory also the id it had before
    ids hashed the weights themselves (``encoders.hf.legacy_dir_id``)."""
    ids = {teacher_weights_id(cfg, pixel_data, key)}
    if cfg.kind != "offline":
        ids.add(legacy_dir_id(_require_dir(cfg, key)))
    return ids


__all__ = [
    "HF_FAMILIES",
    "ImageEncoder",
    "SSLConfig",
    "TeacherConfig",
    "accepted_teacher_ids",
    "build_teacher",
    "teacher_dim",
    "teacher_weights_id",
]
