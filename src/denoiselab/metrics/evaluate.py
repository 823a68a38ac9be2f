"""Evaluation API: generate class-balanced samples, extract features, compute scoreboard metrics.

``evaluate`` knows nothing of training: the model enters only as a callable
``generate(n, labels [n], seed) -> uint8 [n, 3, H, W]``. Samples are streamed batch by
batch through the feature extractors (50K images are never held at once); real-data
statistics come from the content-hashed cache (:mod:`.reference`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .batches import batch_seed, rank_zero_first, run_batches
from .extractors import Extractor, load_clip, load_dinov2, load_inception, resolve_extractor_path
from .frechet import frechet_distance, gaussian_stats
from .images import ensure_rgb
from .inception_score import inception_score
from .kernels import kid, l2_normalize, mmd_rbf
from .precision_recall import precision_recall
from .probe import load_probe
from .probe_train import ProbeConfig
from .reference import ReferenceStats, check_dimension, load_reference_npz, reference_stats

__all__ = [
    "METRICS",
    "MetricInputs",
    "MetricSpec",
    "balanced_labels",
    "batch_seed",
    "check_sample_count",
    "evaluate",
]

ExtractorKind = Literal["probe", "inception", "clip", "dinov2"]
Generate = Callable[[int, Tensor, int], Tensor]


@dataclass(frozen=True)
class MetricInputs:
    """What a metric sees: generated features ``[n, D]`` (and logits ``[n, C]``), labels, reference."""

    fake: Tensor
    fake_logits: Tensor | None
    labels: Tensor
    reference: ReferenceStats | None


@dataclass(frozen=True)
class MetricSpec:
    """A scoreboard metric: which extractor it reads and how its values are computed."""

    extractor: ExtractorKind
    compute: Callable[[MetricInputs], dict[str, float]]
    description: str
    needs_logits: bool = False
    needs_reference: bool = True
    needs_features: bool = False  # real feature rows, not only the Gaussian statistics
    min_num: int = 2  # samples it needs (covariances: 2; k-NN radii: k + 1; IS: its splits)


def _fd(key: str) -> Callable[[MetricInputs], dict[str, float]]:
    return lambda m: {key: frechet_distance(gaussian_stats(m.fake), m.reference.stats)}


def _mmd(key: str) -> Callable[[MetricInputs], dict[str, float]]:
    def compute(m: MetricInputs) -> dict[str, float]:
        result = mmd_rbf(l2_normalize(m.reference.features.double()), l2_normalize(m.fake.double()))
        return {key: result.biased, f"{key}_unbiased": result.unbiased}

    return compute


def _pr(suffix: str) -> Callable[[MetricInputs], dict[str, float]]:
    def compute(m: MetricInputs) -> dict[str, float]:
        # k-NN radii depend on sample density: compare sets of equal size.
        size = min(len(m.fake), len(m.reference.features))
        pr = precision_recall(m.reference.features[:size], m.fake[:size], k=3)
        return {f"precision{suffix}": pr.precision, f"recall{suffix}": pr.recall}

    return compute


def _kid(m: MetricInputs) -> dict[str, float]:
    result = kid(m.fake, m.reference.features)  # torch-fidelity order: generated first
    return {"kid": result.mean, "kid_std": result.std}


def _is(m: MetricInputs) -> dict[str, float]:
    result = inception_score(m.fake_logits)
    return {"is": result.mean, "is_std": result.std}


def _acc(m: MetricInputs) -> dict[str, float]:
    return {"acc_probe": (m.fake_logits.argmax(dim=1) == m.labels).double().mean().item()}


METRICS: dict[str, MetricSpec] = {
    "fd_probe": MetricSpec("probe", _fd("fd_probe"), "Fréchet distance of probe features"),
    "mmd_probe": MetricSpec(
        "probe",
        _mmd("mmd_probe"),
        "RBF-MMD (σ=10, ×1000) of unit probe features",
        needs_features=True,
    ),
    "acc_probe": MetricSpec(
        "probe",
        _acc,
        "probe accuracy on the requested class",
        needs_logits=True,
        needs_reference=False,
    ),
    "pr_probe": MetricSpec(
        "probe",
        _pr("_probe"),
        "k-NN precision/recall (k=3) of probe features",
        needs_features=True,
        min_num=4,
    ),
    "fid": MetricSpec("inception", _fd("fid"), "Fréchet Inception distance (TF-Inception pool3)"),
    "cmmd": MetricSpec(
        "clip",
        _mmd("cmmd"),
        "CMMD: RBF-MMD (σ=10, ×1000) of unit CLIP embeddings",
        needs_features=True,
    ),
    "dino_mmd": MetricSpec(
        "dinov2",
        _mmd("dino_mmd"),
        "RBF-MMD (σ=10, ×1000) of unit DINOv2 CLS",
        needs_features=True,
    ),
    "kid": MetricSpec(
        "inception",
        _kid,
        "kernel Inception distance (cubic kernel, 100 subsets)",
        needs_features=True,
    ),
    "is": MetricSpec(
        "inception",
        _is,
        "Inception score (10 splits)",
        needs_logits=True,
        needs_reference=False,
        min_num=10,
    ),
    "pr": MetricSpec(
        "inception",
        _pr(""),
        "k-NN precision/recall (k=3) of Inception pool3",
        needs_features=True,
        min_num=4,
    ),
}


def check_sample_count(
    metrics: Sequence[str], num: int, key: str = "num", error: type[Exception] = ValueError
) -> None:
    """``error`` naming ``key`` when ``num`` samples are too few for one of ``metrics`` (names
    not in :data:`METRICS` are left to the caller): before any sample is generated."""
    for name in dict.fromkeys(metrics):
        spec = METRICS.get(name)
        if spec is not None and num < spec.min_num:
            raise error(
                f"{key}={num}: {name} needs num >= {spec.min_num} samples (got {num}): "
                f"{spec.description}"
            )


def balanced_labels(num: int, num_classes: int) -> Tensor:
    """``label_i = i mod num_classes``: ``num / num_classes`` per class (50 each for 50K / 1000)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return torch.arange(num) % num_classes


def evaluate(
    generate: Generate,
    *,
    metrics: Sequence[str],
    num: int,
    dataset_cfg: Any,
    num_classes: int,
    batch: int = 64,
    seed: int = 0,
    extractor_paths: Mapping[str, str | Path] | None = None,
    cache_dir: str | Path | None = None,
    num_ref: int | None = None,
    max_ref_features: int = 10_000,
    reference_files: Mapping[str, str | Path] | None = None,
    dataset: Any = None,
    probe_config: ProbeConfig | None = None,
    inception_resize: str = "tf1_bilinear",
    device: str | torch.device = "cpu",
    extractors: Mapping[str, Extractor] | None = None,
) -> dict[str, Any]:
    """Score ``num`` class-balanced samples of ``generate`` on ``metrics`` (names in :data:`METRICS`).

    Batch ``i`` is ``generate(n_i, labels_i, batch_seed(seed, i))`` with labels from
    :func:`balanced_labels`. Reference statistics use ``num_ref`` real images (default
    ``num``) of ``dataset`` (built from ``dataset_cfg`` when not given), drawn with a fixed
    seed so that every evaluation of a dataset shares them. Pretrained
    extractors come from ``extractor_paths`` (keys ``inception``, ``clip``, ``dinov2``) or
    ``<cache root>/extractors``; ``inception_resize`` picks the TF-Inception input resize
    (``"tf1_bilinear"``, ADM/torch-fidelity, or ``"antialias"``, torchmetrics). Under an
    initialised process group each rank generates a share of the batches (same result as one
    process). ``reference_files`` maps an extractor kind (``"inception"``) to published
    statistics (:func:`~.reference.load_reference_npz`: ``mu``, ``sigma``) used instead of
    statistics of ``dataset``; the dataset is then not needed unless another metric needs it.
    ``extractors`` maps a kind to an extractor already loaded (CMMD's ``clip`` served by a
    CLIPScore scorer's vision tower), used instead of loading that kind again.
    Returns the metric values under ``"metrics"`` plus everything needed to reproduce and
    compare them, among which ``"probe_real_accuracy"``: the probe's accuracy on held-out real
    images (``None`` without probe metrics), which tells generation errors from the judge's
    own errors.
    """
    start = time.perf_counter()
    if num < 2 or batch < 1:  # checked before any probe training or reference pass
        raise ValueError(f"num={num} must be >= 2 (distances need two samples), batch={batch} >= 1")
    specs = _resolve(metrics)
    check_sample_count(specs, num)
    if num_ref is not None:  # real feature rows are a sample set too (precision/recall)
        check_sample_count([n for n, s in specs.items() if s.needs_features], num_ref, "num_ref")
    files = {k: load_reference_npz(v) for k, v in (reference_files or {}).items()}
    _check_file_references(specs, files)
    kinds = list(dict.fromkeys(spec.extractor for spec in specs.values()))
    needs_ref = {spec.extractor for spec in specs.values() if spec.needs_reference}
    if dataset is None and ("probe" in kinds or needs_ref - set(files)):
        from ..data import build_dataset

        dataset = build_dataset(dataset_cfg)
    given = dict(extractors or {})
    references: dict[str, ReferenceStats] = {}
    with rank_zero_first():  # rank 0 trains the probe / computes the references into the cache
        extractors = {
            kind: given[kind]
            if kind in given
            else _build_extractor(
                kind,
                dataset_cfg,
                dataset,
                extractor_paths or {},
                cache_dir,
                device,
                probe_config,
                inception_resize,
            )
            for kind in kinds
        }
        for kind in kinds:
            if kind in files:
                check_dimension(files[kind], extractors[kind], kind)
                references[kind] = files[kind]
            elif kind in needs_ref:
                references[kind] = reference_stats(
                    extractors[kind],
                    dataset_cfg,
                    num=num_ref or num,
                    dataset=dataset,
                    max_features=max_ref_features,
                    cache_dir=cache_dir,
                )
    if "acc_probe" in specs and extractors["probe"].num_classes != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the dataset (and its probe) has "
            f"{extractors['probe'].num_classes} classes: acc_probe needs the same classes"
        )
    labels = balanced_labels(num, num_classes)
    with_logits = {spec.extractor for spec in specs.values() if spec.needs_logits}
    run = _generate_features(generate, labels, batch, seed, extractors, with_logits)
    values: dict[str, float] = {}
    for spec in specs.values():
        kind = spec.extractor
        inputs = MetricInputs(
            run.features[kind], run.logits.get(kind), labels, references.get(kind)
        )
        values.update(spec.compute(inputs))
    return {
        "metrics": values,
        "num": num,
        "num_classes": num_classes,
        "labels": "balanced: label_i = i mod num_classes",
        "seed": seed,
        "batch": batch,
        "world_size": run.world,
        "batch_seeds": run.seeds,
        "image_shape": run.image_shape,
        "probe_real_accuracy": _probe_accuracy(extractors.get("probe")),
        "extractors": {kind: _describe(ex) for kind, ex in extractors.items()},
        "reference": {kind: _describe_reference(ref) for kind, ref in references.items()},
        "generation_time_s": run.seconds,
        "generation_images_per_s": num / run.seconds if run.seconds > 0 else None,
        "wall_time_s": time.perf_counter() - start,
    }


@dataclass
class _Run:
    features: dict[str, Tensor]
    logits: dict[str, Tensor]
    seeds: list[int]
    seconds: float
    image_shape: list[int]
    world: int


def _generate_features(
    generate: Generate,
    labels: Tensor,
    batch: int,
    seed: int,
    extractors: Mapping[str, Extractor],
    with_logits: set[str],
) -> _Run:
    """Generate batch by batch (timed on its own) and stream each batch through every
    extractor; under a process group the batches are shared out over the ranks
    (:func:`~.batches.run_batches`), and the features gathered do not depend on their number."""

    def features(images: Tensor, start: int, stop: int) -> tuple[dict[str, Tensor], ...]:
        images = ensure_rgb(images)
        feats, logs = {}, {}
        for kind, extractor in extractors.items():
            if kind in with_logits:
                feats[kind], logs[kind] = extractor.features_and_logits(images)
            else:
                feats[kind] = extractor(images)
        return feats, logs

    run = run_batches(
        lambda start, stop, s: generate(stop - start, labels[start:stop], s),
        features,
        len(labels),
        batch,
        seed,
        "labels",
    )
    return _Run(
        features={k: torch.cat([f[k] for f, _ in run.results]) for k in extractors},
        logits={k: torch.cat([g[k] for _, g in run.results]) for k in with_logits},
        seeds=run.seeds,
        seconds=run.seconds,
        image_shape=run.image_shape,
        world=run.world,
    )


def _resolve(metrics: Sequence[str]) -> dict[str, MetricSpec]:
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"unknown metric(s) {unknown or '(none given)'}; valid names: {', '.join(METRICS)}"
        )
    return {name: METRICS[name] for name in dict.fromkeys(metrics)}


def _build_extractor(
    kind: str,
    dataset_cfg: Any,
    dataset: Any,
    paths: Mapping[str, str | Path],
    cache_dir: str | Path | None,
    device: str | torch.device,
    probe_config: ProbeConfig | None,
    inception_resize: str = "tf1_bilinear",
) -> Extractor:
    if kind == "probe":
        return load_probe(
            dataset_cfg, dataset=dataset, config=probe_config, cache_dir=cache_dir, device=device
        )
    path = resolve_extractor_path(kind, paths.get(kind), cache_dir)
    if kind == "inception":
        return load_inception(path, device, resize=inception_resize)
    return {"clip": load_clip, "dinov2": load_dinov2}[kind](path, device)


def _probe_accuracy(probe: Extractor | None) -> float | None:
    """The probe's accuracy on the held-out real images of its training split."""
    value = getattr(probe, "meta", {}).get("val_accuracy") if probe is not None else None
    return None if value is None else float(value)


def _describe(extractor: Extractor) -> dict[str, Any]:
    info = {
        "name": extractor.name,
        "weights_id": extractor.weights_id,
        "preprocessing": extractor.preprocessing,
    }
    if hasattr(extractor, "meta"):
        info["val_accuracy"] = extractor.meta.get("val_accuracy")
    return info


def _check_file_references(specs: Mapping[str, MetricSpec], files: Mapping[str, Any]) -> None:
    """Published statistics hold ``mu`` and ``sigma`` only: no metric may need feature rows,
    and each file must serve a requested metric."""
    unused = set(files) - {spec.extractor for spec in specs.values() if spec.needs_reference}
    if unused:
        raise ValueError(
            f"reference statistics given for {sorted(unused)}, but no requested metric compares "
            f"with them (metrics: {', '.join(specs)})"
        )
    for name, spec in specs.items():
        if spec.extractor in files and spec.needs_features:
            raise ValueError(
                f"{name} needs real-image feature rows, but the {spec.extractor} reference is "
                f"the statistics file {str(files[spec.extractor].path)!r} (mu and sigma only); "
                "drop the metric or compute the reference from the data"
            )


def _describe_reference(reference: ReferenceStats) -> dict[str, Any]:
    if reference.meta.get("source") == "file":
        return {**reference.meta, "count": None, "raw_features": 0}
    return {
        "count": reference.stats.count,
        "raw_features": len(reference.features),
        "path": str(reference.path),
    }
