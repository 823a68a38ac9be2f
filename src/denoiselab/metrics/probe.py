"""The offline default feature network: a small CNN classifier trained on the built-in data.

It gives ``fd_probe``, ``mmd_probe``, ``pr_probe`` and ``acc_probe`` (does a sample asked
for class k look like class k?) with no download. The trained weights are cached as
safetensors at ``<cache root>/probes/probe-<hash>.safetensors``, the hash covering the
dataset config, the :class:`ProbeConfig` (architecture width and training recipe) and the
code version, so every evaluation of a dataset uses the very same probe. The cache-file code
(:func:`cached_net`, :func:`write_net_file`, :func:`read_net_file`) also serves the attribute
probe (:mod:`.attribute_probe`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from .cache import atomic_write, cache_root, content_hash, data_key, to_jsonable
from .images import check_uint8_images, ensure_rgb, from_uint8
from .probe_train import N, ProbeConfig, ProbeNet, accuracy, materialize, train_probe

__all__ = [
    "PROBE_CODE_VERSION",
    "ProbeExtractor",
    "cached_net",
    "fit_probe",
    "load_probe",
    "probe_path",
    "read_net_file",
    "write_net_file",
]

PROBE_CODE_VERSION = "probe-v1"  # bump when ProbeNet or the training recipe changes


class ProbeExtractor:
    """Probe features ``[B, F]`` and logits ``[B, C]`` from ``uint8 [B, 3|1, H, W]`` images.

    Images of another size than the probe's training size are resized (bilinear,
    antialiased) before the network.
    """

    name = "probe"

    def __init__(self, net: ProbeNet, meta: dict[str, Any], device: torch.device) -> None:
        self.net, self.meta, self.device = net.to(device), meta, device
        self.image_size = int(meta["image_size"])
        self.num_classes = int(meta["num_classes"])
        self.weights_id = str(meta["key"])
        self.preprocessing = {
            "implementation": f"denoiselab ProbeNet ({PROBE_CODE_VERSION})",
            "scale": "u / 127.5 − 1",
            "resize": "bilinear antialias when the size differs",
            "size": self.image_size,
            "features": f"global average pool of the last stage ({net.feature_dim})",
        }

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = from_uint8(ensure_rgb(check_uint8_images(images)))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        features, logits = self.net(x.to(self.device))
        return features.float().cpu(), logits.float().cpu()

    def __call__(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]


def probe_path(dataset_cfg: Any, config: ProbeConfig, cache_dir: str | Path | None = None) -> Path:
    """Cache file of the probe for ``(dataset_cfg, config, code version)``."""
    key = content_hash(
        {
            "dataset": data_key(dataset_cfg),
            "probe": config,
            "code": PROBE_CODE_VERSION,
            "denoiselab": __version__,
        }
    )
    return cache_root(cache_dir) / "probes" / f"probe-{key}.safetensors"


def load_probe(
    dataset_cfg: Any,
    *,
    dataset: Any = None,
    config: ProbeConfig | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> ProbeExtractor:
    """The cached probe for ``dataset_cfg``; trained (seconds to minutes on CPU) if absent.

    ``dataset`` is the map-style dataset built from ``dataset_cfg`` (built with
    ``denoiselab.data.build_dataset`` when not given); it is only touched for training.
    """
    config = config or ProbeConfig()
    path = probe_path(dataset_cfg, config, cache_dir)

    def fit() -> tuple[ProbeNet, dict[str, Any]]:
        from ..data import build_dataset

        data = dataset if dataset is not None else build_dataset(dataset_cfg)
        net, meta = fit_probe(data, config)
        return net, {**meta, "dataset": to_jsonable(dataset_cfg)}

    net, meta = cached_net(path, fit, _build_net)
    return ProbeExtractor(net, meta, torch.device(device))


def fit_probe(dataset: Any, config: ProbeConfig) -> tuple[ProbeNet, dict[str, Any]]:
    """Train a probe on a seeded split of ``dataset`` and measure held-out accuracy.

    The first ``num_train`` images of a seeded permutation train it, the next ``num_val``
    (at most a fifth of a small dataset) give ``val_accuracy``.
    """
    start = time.perf_counter()
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_val = min(config.num_val, n // 5)
    n_train = min(config.num_train, n - n_val)
    x_train, y_train = materialize(dataset, order[:n_train])
    x_val, y_val = materialize(dataset, order[n_train : n_train + n_val])
    num_classes = int(dataset.num_classes)
    net = train_probe(x_train, y_train, num_classes, config)
    meta = {
        "num_classes": num_classes,
        "image_size": int(x_train.shape[-1]),
        "config": to_jsonable(config),
        "code": PROBE_CODE_VERSION,
        "val_accuracy": accuracy(net, x_val, y_val) if n_val else None,
        "num_train": n_train,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    return net, meta


def _build_net(meta: dict[str, Any]) -> ProbeNet:
    return ProbeNet(int(meta["num_classes"]), int(meta["image_size"]), int(meta["config"]["width"]))


def cached_net(
    path: Path,
    fit: Callable[[], tuple[nn.Module, dict[str, Any]]],
    build: Callable[[dict[str, Any]], N],
) -> tuple[N, dict[str, Any]]:
    """The frozen net cached at ``path`` (``<cache root>/probes/<kind>-<key>.safetensors``)
    and its metadata; when the file is absent, ``fit() -> (net, meta)`` first and the result
    is written (:func:`write_net_file`, with ``meta["key"] = <key>``). The class probe's
    and the attribute probe's cache; ``build(meta)`` makes the empty net to load into."""
    if not path.is_file():
        net, meta = fit()
        write_net_file(path, net, {**meta, "key": path.stem.split("-", 1)[1]})
    return read_net_file(path, build)


def write_net_file(path: Path, net: nn.Module, meta: dict[str, Any]) -> None:
    """``net``'s state dict as safetensors, ``meta`` as its metadata (each value JSON), written
    atomically (a killed write leaves no file)."""
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=metadata))


def read_net_file(path: Path, build: Callable[[dict[str, Any]], N]) -> tuple[N, dict[str, Any]]:
    """``(net, meta)`` of a file :func:`write_net_file` wrote: ``build(meta)`` loaded with
    its weights (strictly: a missing or extra tensor is an error), eval mode, frozen."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    net = build(meta)
    net.load_state_dict(safetensors.torch.load_file(str(path)))
    return net.eval().requires_grad_(False), meta
