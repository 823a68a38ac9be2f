"""Datasets and deterministic, resumable batching.

Every dataset is map-style: ``ds[i] -> (image float32 [C, H, W] in [-1, 1], label int)``, with
``num_classes``, ``channels``, ``image_size``, ``class_names`` and ``caption(i)``.

- ``shapes`` (default): procedural coloured shapes, 8 classes, any resolution, pure in (seed, i).
- ``digits``: scikit-learn's 1797 handwritten 8×8 digits, resized.
- ``imagefolder``: ``root/<class>/*.jpg`` (or a flat folder) with JiT's ADM centre crop and
  random flips; captions from ``metadata.jsonl`` or sidecar ``.txt`` files.
- ``latents``: a latent cache written by ``denoiselab cache-latents`` (raw latents, normalised
  at load time; flips use the cached encodings of mirrored images).

``StepLoader`` yields the batch of step ``s`` as a pure function of ``(seed, s)``, sharded
over ``rank · grad_accum + micro_step``, so resuming and re-sharding are exact.
"""

from denoiselab.data.base import ImageDataset, flip_decision
from denoiselab.data.captions import CaptionError
from denoiselab.data.config import DataConfig, DatasetName, build_dataset
from denoiselab.data.digits import DigitsDataset
from denoiselab.data.imagefolder import ImageFolderDataset, ImageFolderError, center_crop_arr
from denoiselab.data.latents import LatentDataset
from denoiselab.data.loader import (
    StepBatchSampler,
    StepLoader,
    epoch_permutation,
    global_batch_indices,
    step_batch,
)
from denoiselab.data.shapes import SHAPE_NAMES, ShapesDataset, ShapeSpec, draw_spec, render

__all__ = [
    "SHAPE_NAMES",
    "CaptionError",
    "DataConfig",
    "DatasetName",
    "DigitsDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageFolderError",
    "LatentDataset",
    "ShapeSpec",
    "ShapesDataset",
    "StepBatchSampler",
    "StepLoader",
    "build_dataset",
    "center_crop_arr",
    "draw_spec",
    "epoch_permutation",
    "flip_decision",
    "global_batch_indices",
    "render",
    "step_batch",
]
