"""The offline teacher: a small ViT trained once, label-free, on the built-in data, and cached.

``<cache root>/teachers/ssl-vit-<hash>.safetensors`` (weights, safetensors; metadata: recipe,
image size, k-NN accuracy, training seconds). The hash covers the pixel data it trains on
(flips, workers and the in-memory cache excluded: they do not change the images), the
:class:`~denoiselab.encoders.ssl.SSLConfig` and the code version, so every run on the same
data uses the very same teacher. Training (:mod:`denoiselab.encoders.ssl`) takes about two
minutes on 2 CPU cores; under DDP rank 0 trains it while the others wait.
"""

from __future__ import annotations

import fcntl
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from denoiselab import __version__
from denoiselab.config import to_dict
from denoiselab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder
from denoiselab.encoders.ssl import SSLConfig, TinyViT, knn_accuracy, train_ssl
from denoiselab.metrics.cache import atomic_write, cache_root, content_hash, to_jsonable

SSL_CODE_VERSION = "ssl-vit-v1"  # bump when TinyViT or the recipe in ssl.py changes
_DATA_KEYS_IGNORED = ("hflip", "num_workers", "cache")


class OfflineEncoder(ImageEncoder):
    """The cached :class:`TinyViT`: final-LayerNorm patch tokens ``[B, (S/p)², width]``."""

    kind = "offline"

    def __init__(self, net: TinyViT, meta: dict[str, Any], key: str) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        cfg = SSLConfig(**meta["config"])
        self.net, self.meta = net, meta
        self.name, self.weights_id = f"ssl-vit-{key}", key
        self.dim, self.patch_size = cfg.width, cfg.patch
        self.resolution = int(meta["image_size"])
        self.freeze()

    def tokens(self, pixel_values: Tensor) -> Tensor:
        return self.net(pixel_values)


def data_key(data_cfg: Any) -> dict[str, Any]:
    """The fields of a pixel ``DataConfig`` that decide its images."""
    return {k: v for k, v in to_dict(data_cfg).items() if k not in _DATA_KEYS_IGNORED}


def teacher_key(data_cfg: Any, cfg: SSLConfig) -> str:
    """The content hash naming the offline teacher of ``data_cfg`` and recipe ``cfg``."""
    payload = {"data": data_key(data_cfg), "ssl": cfg, "code": SSL_CODE_VERSION}
    return content_hash({**payload, "denoiselab": __version__})


def teacher_path(data_cfg: Any, cfg: SSLConfig, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "teachers" / f"ssl-vit-{teacher_key(data_cfg, cfg)}.safetensors"


def load_offline_teacher(
    data_cfg: Any,
    cfg: SSLConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    log: Any = None,
) -> OfflineEncoder:
    """The cached offline teacher of pixel data ``data_cfg``; trained first if absent.

    Under ``torch.distributed`` only rank 0 trains; the other ranks wait at a barrier.
    Separate processes (ablation variants run side by side) wait on a file lock, so the
    teacher is trained once.
    """
    cfg = cfg or SSLConfig()
    path = teacher_path(data_cfg, cfg, cache_dir)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not path.is_file() and (not dist or torch.distributed.get_rank() == 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other processes (ablation variants) wait
            if not path.is_file():
                _fit_and_save(data_cfg, cfg, path, log)
    if dist:
        torch.distributed.barrier()
    return _read(path).to(device)


def _fit_and_save(data_cfg: Any, cfg: SSLConfig, path: Path, log: Any) -> None:
    from denoiselab.data import build_dataset

    start = time.perf_counter()
    dataset = build_dataset(replace(data_cfg, hflip=False, cache=False))
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = min(cfg.num_val, n // 5)
    n_train = min(cfg.num_train, n - n_val)
    x, y = _materialize(dataset, order[: n_train + n_val])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    if log:
        log(f"offline teacher: training on {n_train} images (once; cached at {path})")
    net = train_ssl(x[:n_train], cfg, mean, std, log)
    with torch.no_grad():
        feats = torch.cat([net((c - mean) / std).mean(1) for c in x.split(256)])
    acc = (
        knn_accuracy(feats[:n_train], y[:n_train], feats[n_train:], y[n_train:]) if n_val else None
    )
    meta = {
        "config": to_jsonable(cfg),
        "image_size": int(x.shape[-1]),
        "data": data_key(data_cfg),
        "code": SSL_CODE_VERSION,
        "knn_accuracy": acc,
        "num_train": n_train,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=metadata))
    if log:
        log(f"offline teacher: k-NN accuracy {acc} in {meta['train_seconds']} s → {path}")


def _materialize(dataset: Any, indices: list[int]) -> tuple[Tensor, Tensor]:
    """Images as ``[N, 3, S, S]`` in ``[0, 1]`` (grey repeated) and labels ``[N]``."""
    items = [dataset[i] for i in indices]
    x = torch.stack([torch.as_tensor(item[0]) for item in items]).float()
    return (x.expand(-1, 3, -1, -1) + 1) / 2, torch.tensor([int(item[1]) for item in items])


def _read(path: Path) -> OfflineEncoder:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    with torch.random.fork_rng(devices=[]):  # its throw-away init must not move the global RNG
        net = TinyViT(SSLConfig(**meta["config"]), int(meta["image_size"]))
    net.load_state_dict(safetensors.torch.load_file(str(path)))
    return OfflineEncoder(net, meta, path.stem.removeprefix("ssl-vit-"))
