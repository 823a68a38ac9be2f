"""transformers vision models from a local directory: the one loader for teachers and metrics.

Nothing is downloaded: ``from_pretrained(path, local_files_only=True)``. The same helpers load
the CMMD / DINO-MMD extractors (:mod:`denoiselab.metrics.extractors`) and the REPA teachers
(:class:`HFPatchEncoder`).

Teachers by ``kind`` (the ``model_type`` in the directory's ``config.json`` picks the class):

| kind     | model_type                          | class                     | tokens dropped       |
| -------- | ----------------------------------- | ------------------------- | -------------------- |
| `dinov2` | `dinov2`, `dinov2_with_registers`   | `Dinov2Model`, `Dinov2WithRegistersModel` | CLS (+ registers) |
| `dinov3` | `dinov3_vit`                        | `DINOv3ViTModel`          | CLS + registers      |
| `clip`   | `clip`, `clip_vision_model`         | `CLIPVisionModel`         | CLS                  |
| `siglip` | `siglip`, `siglip_vision_model`     | `SiglipVisionModel`       | none (no CLS token)  |

Features are the last hidden state's patch tokens (DINOv2/v3: after the final LayerNorm, the
``x_norm_patchtokens`` REPA aligns to; CLIP: before its post-LayerNorm, which only the pooled
token gets; SigLIP: after its post-LayerNorm). Mean/std come from the directory's
``preprocessor_config.json`` when present, else the family's published values.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from denoiselab.encoders.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageEncoder


@dataclass(frozen=True)
class HFFamily:
    """One teacher kind: ``model_type → class name``, default normalisation and input side
    (``None``: the checkpoint's own ``image_size``, whose position table is fixed)."""

    classes: dict[str, str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resolution: int | None


HF_FAMILIES: dict[str, HFFamily] = {
    # REPA feeds DINOv2 224×224 images (a 16×16 grid at patch 14), not the 518 of its config.
    "dinov2": HFFamily(
        {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"},
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
    ),
    "dinov3": HFFamily({"dinov3_vit": "DINOv3ViTModel"}, IMAGENET_MEAN, IMAGENET_STD, 224),
    "clip": HFFamily(
        {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel"},
        CLIP_MEAN,
        CLIP_STD,
        None,
    ),
    "siglip": HFFamily(
        {"siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"},
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        None,
    ),
}


def import_transformers(what: str, error: type[Exception] = ImportError) -> Any:
    """The ``transformers`` module, or ``error`` naming ``what`` needs it."""
    try:
        import transformers
    except ImportError as err:
        raise error(f"{what} needs transformers (pip install transformers): {err}") from err
    return transformers


def read_model_type(path: Path) -> str | None:
    """``model_type`` of ``path/config.json``."""
    return json.loads((path / "config.json").read_text()).get("model_type")


def load_pretrained(path: Path, class_name: str, what: str, error: type[Exception]) -> nn.Module:
    """``transformers.<class_name>`` from local ``path`` in float32, frozen, eval mode; weights
    only as safetensors (a ``pytorch_model.bin`` is a pickle, which could run code: refused)."""
    transformers = import_transformers(what, error)
    try:
        model = getattr(transformers, class_name).from_pretrained(
            path, local_files_only=True, dtype=torch.float32, use_safetensors=True
        )
    except OSError as err:
        raise error(
            f"{path}: {err} — denoiselab loads pretrained weights for {what} only as "
            "safetensors (a pickled pytorch_model.bin could run code when loaded); fetch "
            "model.safetensors"
        ) from None
    return model.eval().requires_grad_(False)


def normalisation(
    path: Path, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean``/``image_std`` of ``path/preprocessor_config.json``, else the defaults."""
    config = path / "preprocessor_config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        mean, std = values.get("image_mean", mean), values.get("image_std", std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


_SAMPLE = 1 << 20  # bytes of each weights file hashed at its start and at its end


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 (16 hex) of a weights directory: every ``*.json`` file in full, and of each
    ``*.safetensors`` file its name, size, header (tensor names, dtypes, shapes, offsets) and
    first and last MiB of tensor data — cheap for a multi-GB model, and different for other
    or retrained weights of the same architecture (a fine-tune changes the tensors at both
    ends). The ``weights_id`` of the pretrained encoders and metric extractors (it enters
    the reference-statistics cache key and the teacher record of a latent cache) and the
    text-embedding cache's ``fingerprint``."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.suffix == ".json":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            with open(f, "rb") as stream:
                (n,) = struct.unpack("<Q", stream.read(8))
                h.update(f.name.encode() + str(size).encode() + stream.read(min(n, size)))
                h.update(stream.read(_SAMPLE))
                stream.seek(max(0, size - _SAMPLE))
                h.update(stream.read(_SAMPLE))
    return h.hexdigest()[:16]


def legacy_dir_id(path: Path) -> str:
    """The ``weights_id`` denoiselab gave a directory before 2026-12-01: ``config.json``
    plus the weight files' names and sizes (blind to other weights of the same shapes).
    Only read to accept teacher features cached then (``algorithms.repa``)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


class HFPatchEncoder(ImageEncoder):
    """A transformers vision tower as a teacher: patch tokens of the last hidden state."""

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        name: str,
        weights_id: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        resolution: int,
    ) -> None:
        super().__init__(mean, std)
        cfg = model.config
        self.model, self.kind, self.name, self.weights_id = model, kind, name, weights_id
        self.dim, self.patch_size, self.resolution = cfg.hidden_size, cfg.patch_size, resolution
        self.prefix = prefix_tokens(cfg)
        # CLIP and SigLIP have a fixed position table: another input side interpolates it
        self.interpolate = kind in ("clip", "siglip") and resolution != cfg.image_size
        self.freeze()

    def tokens(self, pixel_values: Tensor) -> Tensor:
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=pixel_values.to(self.mean.dtype), **extra)
        return out.last_hidden_state[:, self.prefix :]


def prefix_tokens(cfg: Any) -> int:
    """Tokens before the patches in the last hidden state: CLS and register tokens."""
    model_type = cfg.model_type
    if model_type in ("siglip", "siglip_vision_model"):
        return 0
    return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)


def load_hf_encoder(
    kind: str,
    path: Path,
    resolution: int | None,
    what: str,
    error: type[Exception],
    grid: int | None = None,
) -> HFPatchEncoder:
    """The ``kind`` teacher at local ``path`` (checked to hold that kind: ``error`` if not).

    Input side: ``resolution``, else ``grid × patch`` (a ``grid × grid`` token grid), else
    the family's default, else the checkpoint's ``image_size``."""
    family = HF_FAMILIES[kind]
    model_type = read_model_type(path)
    if model_type not in family.classes:
        raise error(
            f"{what}: {str(path)!r} holds a {model_type!r} model, not a {kind} teacher "
            f"(model_type one of {sorted(family.classes)})"
        )
    model = load_pretrained(path, family.classes[model_type], what, error)
    mean, std = normalisation(path, family.mean, family.std)
    side = resolution or (grid and grid * int(model.config.patch_size))
    side = side or family.resolution or int(model.config.image_size)
    if side % int(model.config.patch_size):
        raise error(
            f"{what}.resolution={side} is not a multiple of the {kind} patch size "
            f"{model.config.patch_size}"
        )
    return HFPatchEncoder(
        model, kind=kind, name=path.name, weights_id=weights_fingerprint(path), mean=mean, std=std,
        resolution=side,
    )  # fmt: skip
