"""CLIPScore of a text-to-image generator: how well each sample matches its prompt, judged by
a local CLIP (both towers and its tokenizer), with no download.

Two numbers from the same cosines ``c_i = cos(E_img(x_i), E_txt(p_i))`` of projected CLIP
embeddings, sample ``x_i`` generated from prompt ``p_i``:

- ``clipscore`` — Hessel et al. 2021 (CLIPScore, eq. 1): ``2.5 · mean_i max(c_i, 0)``, in
  ``[0, 2.5]``. (Hessel et al. prefix each caption with "A photo depicts"; no prefix here,
  as in torchmetrics and the T2I papers.)
- ``clipscore_cos100`` — the raw ``100 · mean_i c_i`` most text-to-image papers report
  ("CLIP score" of Imagen, SD, PixArt; torchmetrics' ``CLIPScore``, which clamps each
  ``100·c_i`` at 0 first: the two agree whenever every cosine is positive, as with real
  images and a real CLIP).

Preprocessing is the extractor's: images ``uint8 [B, 3, H, W]`` are resized to the vision
tower's ``image_size`` (PIL-style bicubic, as the CMMD extractor), scaled to ``[0, 1]`` and
normalised with the directory's ``preprocessor_config.json`` mean/std (else CLIP's); prompts
are tokenised by the directory's tokenizer.json, truncated (with a warning) to the text tower's
``max_position_embeddings`` (77 for OpenAI CLIP). Weights load only as safetensors.

CMMD reads the same directory's vision tower (:func:`~.extractors.load_clip`): where both
metrics run, :meth:`CLIPScorer.image_embedder` serves CMMD from the loaded scorer, so the
weights are read once and the embeddings are the same numbers.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from denoiselab.encoders.base import CLIP_MEAN, CLIP_STD
from denoiselab.encoders.hf import (
    load_pretrained,
    normalisation,
    read_model_type,
    weights_fingerprint,
)

from .batches import run_batches
from .compositional import PromptGenerate
from .extractors import MissingExtractorError, PixelNorm, embedder_preprocessing
from .images import check_uint8_images, ensure_rgb

__all__ = ["CLIPScorer", "check_clip_dir", "clip_score", "clipscore_values", "load_clip_scorer"]

HESSEL_W = 2.5  # Hessel et al. 2021: rescales the cosines of real captions to about [0, 1]


def clipscore_values(image_embeds: Tensor, text_embeds: Tensor) -> dict[str, float]:
    """``clipscore`` (``2.5 · mean max(cos, 0)``) and ``clipscore_cos100`` (``100 · mean cos``)
    of row-paired embeddings ``[n, D]`` (sample i with prompt i), computed in float64."""
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(
            f"image embeddings {tuple(image_embeds.shape)} and text embeddings "
            f"{tuple(text_embeds.shape)} must both be [n, D], one row per sample"
        )
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=1)
    return {
        "clipscore": HESSEL_W * cos.clamp(min=0).mean().item(),
        "clipscore_cos100": 100.0 * cos.mean().item(),
    }


class CLIPScorer:
    """A CLIP's projected image and text embeddings: ``images(uint8 [B, 3, H, W]) -> [B, D]``
    and ``texts(list of B prompts) -> [B, D]`` (float32, not normalised)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str,
        weights_id: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
    ) -> None:
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device
        self.name, self.weights_id = name, weights_id
        self.max_len = int(model.config.text_config.max_position_embeddings)
        self.pixels = PixelNorm(int(model.config.vision_config.image_size), mean, std, device)
        self.truncated = 0  # prompts cut to max_len so far
        self.preprocessing = {
            "implementation": "transformers.CLIPModel (vision and text towers + projections)",
            **self.pixels.description,
            "tokenizer": type(tokenizer).__name__,
            "max_len": self.max_len,
            "prompt_prefix": None,
        }

    @torch.inference_mode()
    def images(self, images: Tensor) -> Tensor:
        x = self.pixels(ensure_rgb(check_uint8_images(images)))
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return self.model.visual_projection(pooled).float().cpu()

    @torch.inference_mode()
    def texts(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        full = self.tokenizer(list(prompts))["input_ids"]
        cut = sum(len(ids) > self.max_len for ids in full)
        if cut:
            self.truncated += cut
            warnings.warn(
                f"clipscore: {cut} prompt(s) longer than the CLIP text tower's {self.max_len} "
                "tokens were truncated",
                stacklevel=2,
            )
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        ).to(self.device)
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        return self.model.text_projection(pooled).float().cpu()

    def image_embedder(self) -> ScorerImageEmbedder:
        """CMMD's CLIP extractor on this scorer's vision tower (no second copy of the weights)."""
        return ScorerImageEmbedder(self)


class ScorerImageEmbedder:
    """What :func:`~.extractors.load_clip` gives CMMD, served by a loaded :class:`CLIPScorer`:
    ``uint8 [B, 3, H, W] -> image_embeds float32 [B, D]``.

    ``CLIPVisionModelWithProjection`` (load_clip's class) computes
    ``visual_projection(vision_model(x).pooler_output)`` with the vision tower and projection
    of the same checkpoint, which is :meth:`CLIPScorer.images` on the same pixels (same
    ``image_size``, resize and mean/std): the same features, so ``name``, ``weights_id`` and
    ``preprocessing`` are load_clip's too and cached reference statistics stay valid.
    """

    def __init__(self, scorer: CLIPScorer) -> None:
        self.scorer, self.name, self.weights_id = scorer, scorer.name, scorer.weights_id
        self.preprocessing = embedder_preprocessing(
            "CLIPVisionModelWithProjection", scorer.pixels, "image_embeds"
        )

    def __call__(self, images: Tensor) -> Tensor:
        return self.scorer.images(images)


def check_clip_dir(model_dir: str | Path | None, flag: str = "--clip") -> Path:
    """``model_dir`` as a path if it holds what :func:`load_clip_scorer` needs (a
    ``config.json`` with ``model_type: clip`` and a ``tokenizer.json``; the weights are read
    by the loader), else a :class:`MissingExtractorError` naming ``flag`` and what is needed.
    Reads no weights: a config check before a run starts."""
    path = _checked_dir(model_dir, flag)
    if not (path / "tokenizer.json").is_file():
        raise MissingExtractorError(_no_tokenizer(path, flag))
    return path


_NEED = (
    "a local directory with a whole CLIP (config.json with model_type 'clip', "
    "model.safetensors, tokenizer.json), e.g. `huggingface-cli download "
    "openai/clip-vit-large-patch14-336 --local-dir DIR`"
)


def _no_tokenizer(path: Path, flag: str) -> str:
    return (
        f"{flag} {str(path)!r}: no usable CLIP tokenizer there (no tokenizer.json; "
        f"denoiselab reads tokenizers only from that file); clipscore needs {_NEED}"
    )


def _checked_dir(model_dir: str | Path | None, flag: str) -> Path:
    """The directory of a whole CLIP (``config.json``, ``model_type: clip``), else a named error."""
    if model_dir is None:
        raise MissingExtractorError(f"clipscore needs {flag} DIR: {_NEED}")
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise MissingExtractorError(
            f"{flag} {str(path)!r}: no config.json there; clipscore needs {_NEED}"
        )
    model_type = read_model_type(path)
    if model_type != "clip":
        raise MissingExtractorError(
            f"{flag} {str(path)!r} holds a {model_type!r} model; clipscore needs both CLIP "
            f"towers (model_type 'clip', as CLIPModel saves it): {_NEED}"
        )
    return path


def load_clip_scorer(
    model_dir: str | Path | None, device: str | torch.device = "cpu", flag: str = "--clip"
) -> CLIPScorer:
    """A :class:`CLIPScorer` from a local directory holding a whole ``CLIPModel``
    (``model_type: clip``: both towers) and its tokenizer, e.g. openai/clip-vit-large-patch14
    or -336. ``flag`` names where the path came from in errors."""
    path = _checked_dir(model_dir, flag)
    model = load_pretrained(path, "CLIPModel", f"clipscore ({flag})", MissingExtractorError)
    tokenizer = _load_tokenizer(path, flag)
    mean, std = normalisation(path, CLIP_MEAN, CLIP_STD)
    return CLIPScorer(
        model,
        tokenizer,
        name=f"clip:{path.name}",
        weights_id=weights_fingerprint(path),
        mean=mean,
        std=std,
        device=torch.device(device),
    )


def _load_tokenizer(path: Path, flag: str) -> Any:
    """The directory's ``tokenizer.json`` (no code, no pickle: as :class:`~denoiselab.text.hf.
    HFTokenizer`), padding with ``tokenizer_config.json``'s ``pad_token`` (CLIP's
    ``<|endoftext|>``; padding positions are masked and CLIP pools at the first end token)."""
    from denoiselab.encoders.hf import import_transformers

    transformers = import_transformers("clipscore", MissingExtractorError)
    from tokenizers import Tokenizer

    file, config = path / "tokenizer.json", path / "tokenizer_config.json"
    if not file.is_file():  # transformers 5 would build an empty tokenizer (every word unknown)
        raise MissingExtractorError(_no_tokenizer(path, flag))
    pad = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
    pad = (pad.get("content") if isinstance(pad, dict) else pad) or "<|endoftext|>"
    try:
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_file(str(file)), pad_token=pad
        )
    except Exception as err:  # a malformed file: say which
        raise MissingExtractorError(f"{str(file)!r}: not a usable tokenizer: {err}") from None
    if tokenizer.pad_token_id is None or tokenizer.convert_tokens_to_ids(pad) is None:
        raise MissingExtractorError(
            f"{str(file)!r}: its pad token {pad!r} is not in the vocabulary"
        )
    return tokenizer


def clip_score(
    generate: PromptGenerate,
    prompts: Sequence[str],
    scorer: CLIPScorer,
    *,
    batch: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """CLIPScore of ``generate(prompts, seed) -> uint8 [n, 3, H, W]`` on ``prompts``: batch
    ``i`` of the prompts is generated with seed :func:`~.batches.batch_seed` ``(seed, i)``
    and each image scored against its own prompt; under a process group the batches are
    shared out over the ranks (:func:`~.batches.run_batches`: the same values on every rank
    and as in one process). Returns the two values of :func:`clipscore_values` under
    ``metrics`` plus what reproduces them."""
    start = time.perf_counter()
    prompts = list(prompts)

    def embed(images: Tensor, first: int, stop: int) -> tuple[Tensor, Tensor, int]:
        cut = scorer.truncated
        texts = scorer.texts(prompts[first:stop])
        return scorer.images(images), texts, scorer.truncated - cut

    run = run_batches(
        lambda first, stop, seed_i: generate(prompts[first:stop], seed_i),
        embed,
        len(prompts),
        batch,
        seed,
        "prompts",
    )
    images, texts, cuts = zip(*run.results, strict=True)
    return {
        "metrics": clipscore_values(torch.cat(images), torch.cat(texts)),
        "num": len(prompts),
        "truncated_prompts": sum(cuts),
        "extractor": {
            "name": scorer.name,
            "weights_id": scorer.weights_id,
            "preprocessing": scorer.preprocessing,
        },
        "seed": seed,
        "batch": batch,
        "batch_seeds": run.seeds,
        "world_size": run.world,
        "image_shape": run.image_shape,
        "wall_time_s": time.perf_counter() - start,
    }
