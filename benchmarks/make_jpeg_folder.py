"""A synthetic ImageNet-like JPEG folder for timing the input pipeline (no download).

    python benchmarks/make_jpeg_folder.py OUT --images 512 [--classes 8] [--seed 0]

Photos are smooth with some texture, so JPEG sizes and decode costs resemble real ones
more than white noise would: a low-resolution random image upsampled bicubically plus mild
noise, at ImageNet-typical sides (short side 333-500, aspect 4:3 or 3:4; ImageNet's median
photo is about 500×375), saved at quality 90 (ImageNet's train JPEGs average ≈ 110 KB).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def make(out: Path, images: int, classes: int, seed: int) -> float:
    """Write the folder; returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (500, 333), (444, 500)]
    total = 0
    for i in range(images):
        w, h = sizes[i % len(sizes)]
        low = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))
        noisy = np.clip(smooth + rng.normal(0, 16, smooth.shape), 0, 255).astype(np.uint8)
        folder = out / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:06d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        total += path.stat().st_size
    return total / images / 1024


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    kb = make(Path(a.out), a.images, a.classes, a.seed)
    print(f"{a.out}: {a.images} JPEGs, mean {kb:.0f} KB")
