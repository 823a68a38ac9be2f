"""Eigen-spectra for the Gaussian analysis: parsed from a spec string or estimated from data."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DEFAULT_SPECTRUM = "powerlaw:D=64,rank=8,alpha=1,top=1"


def parse_spectrum(spec: str) -> np.ndarray:
    """Eigenvalues ``[D]`` (descending, ≥ 0) from a spec string.

    - ``"powerlaw:D=64,rank=8,alpha=1,top=1,floor=0"``: ``λ_i = top · i^(−alpha)`` for
      ``i = 1 … rank``, ``floor`` for the remaining ``D − rank`` directions.
    - ``"list:4,2,1,0.5,0"``: the given values.
    """
    kind, _, body = spec.partition(":")
    if kind == "list":
        try:
            lam = np.array([float(v) for v in body.split(",") if v.strip()], dtype=np.float64)
        except ValueError:
            raise ValueError(
                f"spectrum {spec!r}: 'list:' takes numbers, e.g. list:4,2,1,0"
            ) from None
    elif kind == "powerlaw":
        params = {"D": 64.0, "rank": 8.0, "alpha": 1.0, "top": 1.0, "floor": 0.0}
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            if key.strip() not in params:
                raise ValueError(f"spectrum {spec!r}: unknown key {key!r}; valid: {list(params)}")
            try:
                params[key.strip()] = float(value)
            except ValueError:
                raise ValueError(
                    f"spectrum {spec!r}: {key.strip()}={value!r} is not a number"
                ) from None
        dim, rank = int(params["D"]), int(params["rank"])
        if not 1 <= rank <= dim:
            raise ValueError(f"spectrum {spec!r}: need 1 <= rank <= D")
        lam = np.full(dim, params["floor"])
        lam[:rank] = params["top"] * np.arange(1, rank + 1, dtype=np.float64) ** -params["alpha"]
    else:
        raise ValueError(f"spectrum {spec!r}: kind must be 'powerlaw' or 'list'")
    if lam.size == 0 or (lam < 0).any() or not np.isfinite(lam).all():
        raise ValueError(f"spectrum {spec!r}: need at least one finite eigenvalue, all >= 0")
    return np.sort(lam)[::-1].copy()


def patch_covariance(images: Tensor, patch: int) -> np.ndarray:
    """Covariance ``[C·p·p, C·p·p]`` of non-overlapping ``p × p`` patches (mean removed).

    ``images: [N, C, H, W]`` with ``H, W`` divisible by ``p``; every patch of every image
    is one observation, flattened channel-major like a JiT patch token.
    """
    _, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}×{w} is not divisible by patch={patch}")
    cols = torch.nn.functional.unfold(images.double(), kernel_size=patch, stride=patch)
    obs = cols.transpose(1, 2).reshape(-1, c * patch * patch)  # [N·L, C·p·p]
    obs = obs - obs.mean(dim=0)
    return (obs.T @ obs / (obs.shape[0] - 1)).numpy()


def dataset_spectrum(
    name: str, image_size: int, patch: int, num_images: int = 512, channels: int = 3
) -> np.ndarray:
    """Eigenvalues ``[C·p·p]`` of the patch covariance of the first ``num_images`` images of
    a built-in dataset (``shapes`` or ``digits``), pixels in ``[-1, 1]``."""
    from denoiselab.data import DataConfig, build_dataset

    ds = build_dataset(DataConfig(name=name, image_size=image_size, channels=channels))  # type: ignore[arg-type]
    n = min(num_images, len(ds))
    images = torch.stack([ds[i][0] for i in range(n)])
    lam = np.linalg.eigvalsh(patch_covariance(images, patch))
    return np.clip(lam, 0.0, None)[::-1].copy()
