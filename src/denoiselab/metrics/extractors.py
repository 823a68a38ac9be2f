"""Pretrained feature extractors for the scoreboard, loaded only from local files.

| kind        | network                                              | metric(s)        |
| ----------- | ---------------------------------------------------- | ---------------- |
| `inception` | TF-Inception v3, ``pt_inception-2015-12-05`` weights  | fid, kid, is, pr |
| `clip`      | CLIP ViT-L/14@336 image embeddings                    | cmmd             |
| `dinov2`    | DINOv2 ViT-L/14 with registers, CLS token             | dino_mmd         |

Every extractor takes ``uint8 [B, 3, H, W]`` and returns ``float32 [B, D]`` features; its
``name``, ``weights_id`` and ``preprocessing`` are recorded with every result and enter
the reference-statistics cache key. Nothing is ever downloaded: torch-fidelity gets an
explicit weights path, transformers gets ``local_files_only=True``. torch-fidelity and
transformers are optional (the ``[eval]`` extra) and imported only here, lazily.

torchvision's ``inception_v3`` is a different network (other weights, other padding and
pooling) and gives different FIDs: it is deliberately not offered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from denoiselab.encoders.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from denoiselab.encoders.hf import (
    load_pretrained,
    normalisation,
    read_model_type,
    weights_fingerprint,
)

from .cache import cache_root
from .images import check_uint8_images, resize_uint8

__all__ = [
    "EXTRACTOR_SOURCES",
    "ClassifierExtractor",
    "Extractor",
    "MissingExtractorError",
    "load_clip",
    "load_dinov2",
    "load_inception",
    "resolve_extractor_path",
]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTOR_SOURCES: dict[str, str] = {
    "inception": (
        f"the TF-Inception weights file {INCEPTION_FILE} (= pytorch-fid's pt_inception-2015-12-05-"
        "6726825d.pth), from https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        f"{INCEPTION_FILE}; FID also needs `pip install torch-fidelity` (pulls torchvision)"
    ),
    "clip": (
        "a local directory with openai/clip-vit-large-patch14-336 (config.json + weights), e.g. "
        "`huggingface-cli download openai/clip-vit-large-patch14-336 --local-dir DIR`; needs "
        "`pip install transformers`"
    ),
    "dinov2": (
        "a local directory with facebook/dinov2-with-registers-large (config.json + weights), e.g. "
        "`huggingface-cli download facebook/dinov2-with-registers-large --local-dir DIR`; needs "
        "`pip install transformers`"
    ),
}
DEFAULT_NAMES = {  # looked up under <cache root>/extractors/ when no path is given
    "inception": INCEPTION_FILE,
    "clip": "clip-vit-large-patch14-336",
    "dinov2": "dinov2-with-registers-large",
}


class MissingExtractorError(FileNotFoundError):
    """A pretrained extractor's files (or its optional package) are not available locally."""


@runtime_checkable
class Extractor(Protocol):
    """``extractor(uint8 [B, 3, H, W]) -> float32 [B, D]`` plus what identifies the features."""

    name: str
    weights_id: str
    preprocessing: dict[str, Any]

    def __call__(self, images: Tensor) -> Tensor: ...


@runtime_checkable
class ClassifierExtractor(Extractor, Protocol):
    """An extractor that also yields class logits ``[B, C]`` from the same forward pass."""

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


INCEPTION_RESIZE = {
    "tf1_bilinear": "tf1_bilinear (TF 1.x resize_bilinear, align_corners=False), as ADM/torch-fidelity",
    "antialias": (
        "antialias (torch bilinear, antialias=True, align_corners=False, as torchmetrics >= 1.8 "
        "FID's default), rounded to uint8 before the network, whose TF1 resize is then the "
        "identity: within 0.5 grey levels of torchmetrics' float input"
    ),
}


def _check_inception_resize(resize: str) -> None:
    if resize not in INCEPTION_RESIZE:
        raise ValueError(f"inception resize {resize!r}; valid: {', '.join(INCEPTION_RESIZE)}")


def resize_for_inception(images: Tensor, resize: str) -> Tensor:
    """``uint8 [B, 3, H, W]`` -> what the TF-Inception network receives under ``resize``:
    unchanged for ``tf1_bilinear`` (the network resizes), else ``uint8 [B, 3, 299, 299]``."""
    _check_inception_resize(resize)
    check_uint8_images(images)
    if resize == "tf1_bilinear" or tuple(images.shape[-2:]) == (299, 299):
        return images
    x = F.interpolate(
        images.float(), size=(299, 299), mode="bilinear", antialias=True, align_corners=False
    )
    return x.round().clamp(0, 255).to(torch.uint8)


class InceptionExtractor:
    """torch-fidelity's ``FeatureExtractorInceptionV3``: pool3 features ``[B, 2048]`` and logits.

    ``resize`` (:data:`INCEPTION_RESIZE`): how images reach 299×299 — the TF1 bilinear resize
    of ADM, torch-fidelity and the JiT paper's numbers (default), or the antialiased resize of
    torchmetrics' FID. The two give different FIDs on small images; the choice is recorded.
    """

    name = "inception-v3-tf-2015-12-05"

    def __init__(
        self,
        net: torch.nn.Module,
        weights_id: str,
        device: torch.device,
        resize: str = "tf1_bilinear",
    ) -> None:
        _check_inception_resize(resize)
        self.net, self.weights_id, self.device, self.resize = net, weights_id, device, resize
        self.preprocessing = {
            "implementation": "torch_fidelity.FeatureExtractorInceptionV3",
            "resize": INCEPTION_RESIZE[resize],
            "size": 299,
            "scale": "(u − 128) / 128",
            "features": "pool3 (2048)",
            "logits": "logits_unbiased (fc without bias, 1008), torch-fidelity's IS input",
        }

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        images = resize_for_inception(images.to(self.device), self.resize)
        features, logits = self.net(images)
        return features.float().cpu(), logits.float().cpu()

    def __call__(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]


class PixelNorm:
    """``uint8 [B, 3, H, W]`` → PIL-style bicubic resize to ``size`` → ``u / 255`` →
    ``(x − mean) / std``, on ``device``: the input of a transformers vision tower (CMMD's
    and DINO's embedders, CLIPScore's image side)."""

    def __init__(
        self, size: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
    ) -> None:
        self.size, self.device = size, device
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.description = {
            "resize": "PIL-style bicubic (antialiased, 8-bit rounding after each pass)",
            "size": size,
            "scale": "u / 255",
            "mean": list(mean),
            "std": list(std),
        }

    def __call__(self, images: Tensor) -> Tensor:
        return (resize_uint8(images.to(self.device), self.size) - self._mean) / self._std


def embedder_preprocessing(class_name: str, pixels: PixelNorm, output: str) -> dict[str, Any]:
    """The ``preprocessing`` record of a transformers image embedder (it enters the reference
    cache key): model class, :class:`PixelNorm`'s steps and the output read."""
    return {
        "implementation": f"transformers.{class_name}",
        **pixels.description,
        "features": output,
    }


class HFImageEmbedder:
    """A transformers vision model behind :class:`PixelNorm`.

    ``output`` picks the model output: ``image_embeds`` (CLIP projection) or
    ``pooler_output`` (DINOv2: the CLS token after the final layer norm).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        weights_id: str,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        output: str,
        device: torch.device,
    ) -> None:
        self.model, self.name, self.weights_id = model.eval().to(device), name, weights_id
        self.output, self.device = output, device
        self.pixels = PixelNorm(size, mean, std, device)
        self.preprocessing = embedder_preprocessing(type(model).__name__, self.pixels, output)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        out = self.model(pixel_values=self.pixels(images))
        return getattr(out, self.output).float().cpu()


def load_inception(
    weights_path: str | Path | None,
    device: str | torch.device = "cpu",
    resize: str = "tf1_bilinear",
) -> InceptionExtractor:
    """TF-Inception from a local ``weights-inception-2015-12-05-6726825d.pth``, with the
    ``resize`` of :data:`INCEPTION_RESIZE`.

    The file is read once, with ``torch.load(weights_only=True)``
    (:func:`denoiselab.safeload.load_torch_tensors`): a file holding anything but tensors is
    refused before torch-fidelity is even imported, and torch-fidelity gets the tensors that
    were read instead of unpickling the path itself.
    """
    from denoiselab.safeload import load_torch_tensors, torch_load_returns

    path = _require_path("inception", weights_path, must_be_file=True)
    state = load_torch_tensors(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise MissingExtractorError(
            f"FID needs torch-fidelity ({err}); {EXTRACTOR_SOURCES['inception']}"
        ) from err
    with torch_load_returns(state):
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(path),
        )
    device = torch.device(device)
    weights_id = f"{path.name}:{path.stat().st_size}"
    return InceptionExtractor(net.to(device), weights_id, device, resize)


def load_clip(model_dir: str | Path | None, device: str | torch.device = "cpu") -> HFImageEmbedder:
    """CLIP image embeddings (``CLIPVisionModelWithProjection.image_embeds``) from a local dir.

    Input size is the checkpoint's ``image_size`` (336 for ViT-L/14@336); normalisation is
    the checkpoint's ``preprocessor_config.json`` mean/std when present, else CLIP's.
    """
    path = _require_path("clip", model_dir, must_be_file=False)
    model = _load("clip", path, "CLIPVisionModelWithProjection")
    mean, std = normalisation(path, CLIP_MEAN, CLIP_STD)
    return HFImageEmbedder(
        model,
        name=f"clip:{path.name}",
        weights_id=weights_fingerprint(path),
        size=int(model.config.image_size),
        mean=mean,
        std=std,
        output="image_embeds",
        device=torch.device(device),
    )


def load_dinov2(
    model_dir: str | Path | None, device: str | torch.device = "cpu", size: int = 224
) -> HFImageEmbedder:
    """DINOv2 CLS token (``pooler_output``) from a local dir, with or without registers.

    ``Dinov2WithRegistersModel`` (facebook/dinov2-with-registers-*) or ``Dinov2Model``
    (facebook/dinov2-*), chosen by the checkpoint's ``model_type``. Images are resized to
    ``size`` (224, the DINOv2 evaluation crop) and normalised with ImageNet mean/std.
    """
    path = _require_path("dinov2", model_dir, must_be_file=False)
    model_type = read_model_type(path)
    classes = {"dinov2_with_registers": "Dinov2WithRegistersModel", "dinov2": "Dinov2Model"}
    if model_type not in classes:
        raise ValueError(f"{path} holds a {model_type!r} model; expected one of {sorted(classes)}")
    model = _load("dinov2", path, classes[model_type])
    mean, std = normalisation(path, IMAGENET_MEAN, IMAGENET_STD)
    return HFImageEmbedder(
        model,
        name=f"dinov2:{path.name}",
        weights_id=weights_fingerprint(path),
        size=size,
        mean=mean,
        std=std,
        output="pooler_output",
        device=torch.device(device),
    )


def resolve_extractor_path(
    kind: str, path: str | Path | None, cache_dir: str | Path | None
) -> Path | None:
    """``path`` if given, else ``<cache root>/extractors/<default name>`` if it exists, else None."""
    if path is not None:
        return Path(path).expanduser()
    default = cache_root(cache_dir) / "extractors" / DEFAULT_NAMES[kind]
    return default if default.exists() else None


def _require_path(kind: str, path: str | Path | None, must_be_file: bool) -> Path:
    hint = (
        f"{kind} extractor needs {EXTRACTOR_SOURCES[kind]}; pass extractor_paths={{'{kind}': PATH}} "
        f"or place it at <cache root>/extractors/{DEFAULT_NAMES[kind]}"
    )
    if path is None:
        raise MissingExtractorError(f"no path given: the {hint}")
    path = Path(path).expanduser()
    ok = path.is_file() if must_be_file else (path / "config.json").is_file()
    if not ok:
        raise MissingExtractorError(f"{path} not found or incomplete: the {hint}")
    return path


def _load(kind: str, path: Path, class_name: str) -> torch.nn.Module:
    """The shared local transformers loader (:func:`denoiselab.encoders.hf.load_pretrained`)."""
    return load_pretrained(path, class_name, f"the {kind} extractor", MissingExtractorError)
