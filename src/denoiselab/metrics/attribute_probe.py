"""The judge of the compositional score: a small CNN with one head per ``shapes`` attribute.

Trained once on real ``shapes`` images (never used in training a generator) and cached as
safetensors at ``<cache root>/probes/attributes-<hash>.safetensors``; the hash covers what
fixes the images (difficulty, textures, data seed), the :class:`AttributeProbeConfig` and the
code version. The metadata keeps the attribute names and the probe's own per-attribute
accuracy on held-out real images (``val_accuracy``), so a score's errors can be told from the
judge's. Held-out (colour, shape) pairs of a training config are *not* held out of the probe's
data: the judge must know every combination a prompt can ask for.

Unlike the class probe (:mod:`.probe`), the heads do not read the average pool alone:
position and size are attributes, so they also read a flattened ``S/8 × S/8`` map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from .cache import cache_root, content_hash, to_jsonable
from .images import check_uint8_images, dataset_uint8, from_uint8
from .probe import cached_net
from .probe_train import _conv, train_net

__all__ = [
    "ATTRIBUTE_PROBE_VERSION",
    "AttributeNet",
    "AttributeProbe",
    "AttributeProbeConfig",
    "load_attribute_probe",
]

ATTRIBUTE_PROBE_VERSION = "attribute-probe-v2"  # bump when the net or the recipe changes


@dataclass(frozen=True)
class AttributeProbeConfig:
    """Architecture and training recipe of the attribute probe; every field enters the key.

    ``image_size``: the probe's input side (images are rendered at it for training and
    generated images are resized to it; the scenes are resolution-free). Augmentation is the
    class probe's (mild blur and noise, :func:`.probe_train.augment`).
    """

    width: int = 16
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    num_train: int = 6000
    num_val: int = 1000
    image_size: int = 32
    aug_prob: float = 0.5
    blur_max: float = 1.0
    noise_max: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "steps", "batch", "num_train", "num_val"):
            if not getattr(self, name) >= 1:
                raise ValueError(
                    f"AttributeProbeConfig.{name}={getattr(self, name)!r}; must be ≥ 1"
                )
        if not 8 <= self.image_size <= 256 or self.image_size % 8:
            raise ValueError(
                f"AttributeProbeConfig.image_size={self.image_size!r}; valid: multiples of 8 "
                "in 8 … 256"
            )


class AttributeNet(nn.Module):
    """``x [B, 3, S, S]`` in [-1, 1] → ``{attribute: logits [B, n_attribute]}``.

    The class probe's trunk (stem conv, two stages of stride-2 conv + conv; ``w, 2w, 4w``
    channels, GroupNorm + SiLU) to an ``S/4`` map, then two readouts: its global average pool
    (``4w``: what is there, wherever it is) and a stride-2 conv to ``S/8 × S/8`` flattened
    through a hidden layer of 128 (where it is, how large). Each head reads both.
    """

    def __init__(self, heads: dict[str, int], image_size: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv(3, width, 1)]
        for c in (width, 2 * width):
            layers += [*_conv(c, 2 * c, 2), *_conv(2 * c, 2 * c, 1)]
        self.trunk = nn.Sequential(*layers)
        side, c = image_size // 8, 4 * width
        self.where = nn.Sequential(
            *_conv(c, c, 2), nn.Flatten(), nn.Linear(c * side * side, 128), nn.SiLU()
        )
        self.heads = nn.ModuleDict({name: nn.Linear(c + 128, n) for name, n in heads.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        features = torch.cat([h.mean(dim=(2, 3)), self.where(h)], dim=1)
        return {name: head(features) for name, head in self.heads.items()}


class AttributeProbe:
    """Predicts every attribute of ``uint8 [B, 3, H, W]`` images (resized to the probe's
    side, bilinear with antialias, when they differ).

    Attributes: ``names`` (``{attribute: names}``), ``meta`` (recipe, ``val_accuracy``
    ``{attribute: accuracy}`` and ``val_all_correct`` on held-out real images, key).
    """

    def __init__(self, net: AttributeNet, meta: dict[str, Any], device: torch.device) -> None:
        self.net, self.meta, self.device = net.to(device), meta, device
        self.names: dict[str, list[str]] = meta["attribute_names"]
        self.image_size = int(meta["config"]["image_size"])
        self.weights_id = str(meta.get("key", ""))

    @torch.inference_mode()
    def predict(self, images: Tensor, batch: int = 256) -> dict[str, Tensor]:
        """``{attribute: predicted index [B]}`` of ``images uint8 [B, 3, H, W]``."""
        images = check_uint8_images(images)
        if images.shape[1] != 3:
            raise ValueError(
                f"the attribute probe reads colour images [B, 3, H, W], got {tuple(images.shape)}"
            )
        out: dict[str, list[Tensor]] = {name: [] for name in self.names}
        for i in range(0, len(images), batch):
            x = from_uint8(images[i : i + batch])
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                size = (self.image_size, self.image_size)
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
            for name, logits in self.net(x.to(self.device)).items():
                out[name].append(logits.argmax(1).cpu())
        return {name: torch.cat(parts) for name, parts in out.items()}


def probe_data_key(dataset_cfg: Any) -> dict[str, Any]:
    """What fixes the probe's images: difficulty, textures and data seed (not the holdout)."""
    return {
        "difficulty": dataset_cfg.difficulty,
        "textures": dataset_cfg.textures,
        "seed": dataset_cfg.seed,
    }


def attribute_probe_path(
    dataset_cfg: Any, config: AttributeProbeConfig, cache_dir: str | Path | None = None
) -> Path:
    key = content_hash(
        {
            "data": probe_data_key(dataset_cfg),
            "probe": config,
            "code": ATTRIBUTE_PROBE_VERSION,
            "denoiselab": __version__,
        }
    )
    return cache_root(cache_dir) / "probes" / f"attributes-{key}.safetensors"


def check_shapes_config(dataset_cfg: Any) -> None:
    """The score names colours of ``shapes`` scenes: other data or grey images cannot be judged."""
    if getattr(dataset_cfg, "name", None) != "shapes" or dataset_cfg.channels != 3:
        raise ValueError(
            f"the compositional score needs data.name='shapes' with channels=3, got "
            f"name={getattr(dataset_cfg, 'name', None)!r}, "
            f"channels={getattr(dataset_cfg, 'channels', None)!r}"
        )


def load_attribute_probe(
    dataset_cfg: Any,
    config: AttributeProbeConfig | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> AttributeProbe:
    """The cached attribute probe for ``dataset_cfg`` (a ``shapes`` ``DataConfig``); trained
    on first use (about a CPU-minute with the default recipe, see docs/architecture.md)."""
    check_shapes_config(dataset_cfg)
    config = config or AttributeProbeConfig()
    path = attribute_probe_path(dataset_cfg, config, cache_dir)
    net, meta = cached_net(path, lambda: fit_attribute_probe(dataset_cfg, config), _build_net)
    return AttributeProbe(net, meta, torch.device(device))


def _build_net(meta: dict[str, Any]) -> AttributeNet:
    heads = {name: len(names) for name, names in meta["attribute_names"].items()}
    return AttributeNet(heads, int(meta["config"]["image_size"]), int(meta["config"]["width"]))


def fit_attribute_probe(
    dataset_cfg: Any, config: AttributeProbeConfig
) -> tuple[AttributeNet, dict[str, Any]]:
    """Train on images ``0 … num_train−1`` of the config's scenes (no holdout), rendered at
    ``config.image_size``, and measure per-attribute accuracy on the next ``num_val``."""
    from ..data.shapes import ShapesDataset

    start = time.perf_counter()
    n_train, n_val = config.num_train, config.num_val
    dataset = ShapesDataset(
        num_images=n_train + n_val,
        image_size=config.image_size,
        seed=dataset_cfg.seed,
        textures=dataset_cfg.textures,
        difficulty=dataset_cfg.difficulty,
    )
    names = {k: list(v) for k, v in dataset.attribute_names.items()}
    images = from_uint8(dataset_uint8(dataset, range(n_train + n_val))[0])
    targets = _targets(dataset, range(n_train + n_val))
    net = _train(images[:n_train], {k: v[:n_train] for k, v in targets.items()}, names, config)
    val = {k: v[n_train:] for k, v in targets.items()}
    with torch.inference_mode():
        logits = net(images[n_train:])
    hits = {k: logits[k].argmax(1) == val[k] for k in names}
    meta = {
        "attribute_names": names,
        "config": to_jsonable(config),
        "data": to_jsonable(probe_data_key(dataset_cfg)),
        "code": ATTRIBUTE_PROBE_VERSION,
        "val_accuracy": {k: round(h.double().mean().item(), 4) for k, h in hits.items()},
        "val_all_correct": round(torch.stack(list(hits.values())).all(0).double().mean().item(), 4),
        "num_train": n_train,
        "num_val": n_val,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    return net, meta


def _targets(dataset: Any, indices: range) -> dict[str, Tensor]:
    rows = [dataset.attributes(i) for i in indices]
    return {k: torch.tensor([r[k] for r in rows]) for k in dataset.attribute_names}


def _train(
    x: Tensor, y: dict[str, Tensor], names: dict[str, list[str]], cfg: AttributeProbeConfig
) -> AttributeNet:
    """The class probe's recipe (:func:`.probe_train.train_net`: AdamW + cosine decay,
    augmented, seeded) on the sum of the per-head cross-entropies."""
    heads = {k: len(v) for k, v in names.items()}
    return train_net(
        lambda: AttributeNet(heads, cfg.image_size, cfg.width),
        x,
        lambda logits, idx: sum(F.cross_entropy(logits[k], y[k][idx]) for k in names),
        cfg,
    )
