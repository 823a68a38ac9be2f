"""Scoreboard metrics: one uint8 conversion, FD/MMD/KID/IS/PR maths, extractors, probe, references.

Metric maths run in float64 and stream or chunk over samples (50K × 2048 features fit in
memory). Metrics take ``uint8 [B, 3, H, W]`` images only; :func:`to_uint8` is the single
conversion from ``[-1, 1]`` floats. Pretrained extractors (TF-Inception, CLIP, DINOv2) load
only from local files; the probe metrics (``fd_probe``, ``mmd_probe``, ``acc_probe``,
``pr_probe``) need no download at all, nor does the compositional score of text-to-image
runs on ``shapes`` (:func:`compositional_score`, judged by :func:`load_attribute_probe`).
CLIPScore of text runs (:func:`clip_score`) reads a local CLIP (:func:`load_clip_scorer`).
"""

from .attribute_probe import AttributeProbe, AttributeProbeConfig, load_attribute_probe
from .clipscore import CLIPScorer, clip_score, clipscore_values, load_clip_scorer
from .compositional import ShapePrompt, compositional_score, real_images, shapes_prompts
from .evaluate import METRICS, MetricSpec, balanced_labels, batch_seed, evaluate
from .extractors import (
    ClassifierExtractor,
    Extractor,
    MissingExtractorError,
    load_clip,
    load_dinov2,
    load_inception,
)
from .frechet import GaussianStats, StreamingGaussianStats, frechet_distance, gaussian_stats
from .images import check_uint8_images, ensure_rgb, from_uint8, to_uint8
from .inception_score import InceptionScore, inception_score
from .kernels import KIDResult, MMDResult, kid, l2_normalize, mmd2, mmd_rbf
from .precision_recall import PrecisionRecall, precision_recall
from .probe import ProbeExtractor, load_probe
from .probe_train import ProbeConfig
from .reference import ReferenceStats, ReferenceStatsError, load_reference_npz, reference_stats

__all__ = [
    "METRICS",
    "AttributeProbe",
    "AttributeProbeConfig",
    "CLIPScorer",
    "ClassifierExtractor",
    "Extractor",
    "GaussianStats",
    "InceptionScore",
    "KIDResult",
    "MMDResult",
    "MetricSpec",
    "MissingExtractorError",
    "PrecisionRecall",
    "ProbeConfig",
    "ProbeExtractor",
    "ReferenceStats",
    "ReferenceStatsError",
    "ShapePrompt",
    "StreamingGaussianStats",
    "balanced_labels",
    "batch_seed",
    "check_uint8_images",
    "clip_score",
    "clipscore_values",
    "compositional_score",
    "ensure_rgb",
    "evaluate",
    "frechet_distance",
    "from_uint8",
    "gaussian_stats",
    "inception_score",
    "kid",
    "l2_normalize",
    "load_attribute_probe",
    "load_clip",
    "load_clip_scorer",
    "load_dinov2",
    "load_inception",
    "load_probe",
    "load_reference_npz",
    "mmd2",
    "mmd_rbf",
    "precision_recall",
    "real_images",
    "reference_stats",
    "shapes_prompts",
    "to_uint8",
]
