"""Reference (real-data) statistics, computed once and cached by content hash as ``.npz``.

One file per (dataset config, extractor name + weights + preprocessing, sample count,
seed, feature cap): the Gaussian statistics (``mean [D]``, ``cov [D, D]``, float64, over
all ``count`` images) for Fréchet distances, plus the first ``max_features`` raw feature
rows (float32) for MMD, KID and precision/recall. Every evaluation reuses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .cache import atomic_write, cache_root, content_hash, data_key, to_jsonable
from .extractors import Extractor
from .frechet import GaussianStats, StreamingGaussianStats
from .images import dataset_uint8

__all__ = [
    "REFERENCE_CODE_VERSION",
    "ReferenceStats",
    "ReferenceStatsError",
    "check_dimension",
    "load_reference_npz",
    "reference_stats",
]

REFERENCE_CODE_VERSION = "reference-v1"  # bump when the way statistics are computed changes


class ReferenceStatsError(ValueError):
    """A reference-statistics file that cannot be used; the message names the file and array."""


@dataclass(frozen=True)
class ReferenceStats:
    """Real-data statistics of one extractor: Gaussian stats and capped raw features ``[M, D]``."""

    stats: GaussianStats
    features: Tensor
    meta: dict[str, Any]
    path: Path


def reference_stats(
    extractor: Extractor,
    dataset_cfg: Any,
    *,
    num: int,
    dataset: Any = None,
    batch: int = 256,
    seed: int = 0,
    max_features: int = 10_000,
    cache_dir: str | Path | None = None,
) -> ReferenceStats:
    """Statistics of ``min(num, len(dataset))`` real images drawn by a seeded permutation.

    Loaded from ``<cache root>/reference/ref-<hash>.npz`` when present, else computed
    (``dataset`` is built from ``dataset_cfg`` with ``denoiselab.data.build_dataset`` when
    not given) and written atomically. ``batch`` only sets the extraction batch size.
    """
    meta = {
        "dataset": data_key(dataset_cfg),
        "extractor": extractor.name,
        "weights_id": extractor.weights_id,
        "preprocessing": to_jsonable(extractor.preprocessing),
        "num": num,
        "seed": seed,
        "max_features": max_features,
        "code": REFERENCE_CODE_VERSION,
    }
    path = cache_root(cache_dir) / "reference" / f"ref-{content_hash(meta)}.npz"
    if not path.is_file():
        if dataset is None:
            from ..data import build_dataset

            dataset = build_dataset(dataset_cfg)
        stats, features = _compute(extractor, dataset, num, batch, seed, max_features)
        meta["count"] = stats.count
        atomic_write(path, lambda tmp: _save(tmp, stats, features, meta))
    return _load(path)


def _compute(
    extractor: Extractor, dataset: Any, num: int, batch: int, seed: int, max_features: int
) -> tuple[GaussianStats, Tensor]:
    count = min(num, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    running: StreamingGaussianStats | None = None
    kept: list[Tensor] = []
    for start in range(0, count, batch):
        images, _ = dataset_uint8(dataset, order[start : start + batch].tolist())
        features = extractor(images)
        running = running or StreamingGaussianStats(features.shape[1])
        running.update(features)
        kept.append(features[: max(0, max_features - start)])
    if running is None:
        raise ValueError("reference statistics need a non-empty dataset and num >= 2")
    return running.finalize(), torch.cat(kept).float()


def _save(tmp: Path, stats: GaussianStats, features: Tensor, meta: dict[str, Any]) -> None:
    with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
        np.savez(
            f,
            mean=stats.mean,
            cov=stats.cov,
            count=np.int64(stats.count),
            features=features.numpy(),
            meta=np.array(json.dumps(meta)),
        )


def _load(path: Path) -> ReferenceStats:
    with np.load(path, allow_pickle=False) as data:
        stats = GaussianStats(data["mean"], data["cov"], int(data["count"]))
        features = torch.from_numpy(data["features"].copy())
        meta = json.loads(str(data["meta"]))
    return ReferenceStats(stats=stats, features=features, meta=meta, path=path)


def load_reference_npz(path: str | Path) -> ReferenceStats:
    """Published reference statistics: an ``.npz`` with ``mu [D]`` and ``sigma [D, D]``.

    The format of ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``: also
    ``arr_0``, ``mu_s``, ``sigma_s``, which are ignored), of torch-fidelity's
    ``fid_statistics_file`` and of the official JiT code (``fid_stats/jit_in256_stats.npz``).
    Read with ``allow_pickle=False``: pickled object arrays are refused, never unpickled.
    Only Gaussian statistics: ``features`` is empty (``[0, D]``), so metrics that need real
    feature rows (KID, precision/recall) cannot use such a file. ``stats.count`` is 0 (the
    files do not say how many images they summarise); ``meta["stats_sha256"]`` identifies
    ``mu`` and ``sigma`` whatever else the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ReferenceStatsError(f"{str(path)!r} is not a readable .npz file: {e}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ReferenceStatsError(f"{str(path)!r} holds one array, not an .npz with mu and sigma")
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ReferenceStatsError(
                f"{str(path)!r} lacks {missing}: reference statistics need arrays 'mu' [D] and "
                f"'sigma' [D, D] (ADM / torch-fidelity / JiT format); found {data.files}"
            )
        mu, sigma = _array(data, "mu", path), _array(data, "sigma", path)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ReferenceStatsError(
            f"{str(path)!r}: 'mu' has shape {list(mu.shape)} and 'sigma' {list(sigma.shape)}; "
            "expected [D] and [D, D]"
        )
    digest = hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()
    meta = {"source": "file", "path": str(path.resolve()), "stats_sha256": digest, "dim": d}
    stats = GaussianStats(mu, sigma, 0)
    return ReferenceStats(stats=stats, features=torch.empty(0, d), meta=meta, path=path)


def _array(data: Any, key: str, path: Path) -> np.ndarray:
    try:
        array = data[key]
    except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise ReferenceStatsError(
            f"{str(path)!r}: {key!r} is a pickled object array ({e}); refusing to unpickle it"
        ) from None
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ReferenceStatsError(
            f"{str(path)!r}: {key!r} has dtype {array.dtype}, not real numbers"
        )
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ReferenceStatsError(f"{str(path)!r}: {key!r} holds non-finite values")
    return array


def check_dimension(ref: ReferenceStats, extractor: Extractor, kind: str) -> None:
    """Before any sample is generated: the file's ``mu`` has the extractor's feature size
    (one grey 64×64 image through the extractor tells it)."""
    probe = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    dim = extractor(probe).shape[1]
    if dim != ref.stats.mean.shape[0]:
        raise ReferenceStatsError(
            f"reference statistics {str(ref.path)!r} are {ref.stats.mean.shape[0]}-dimensional "
            f"but the {kind} features are {dim}-dimensional (TF-Inception pool3: 2048)"
        )
