"""``denoiselab cache-latents CONFIG --out DIR``: encode a pixel dataset once, with flip variants.

Shard ``k`` holds samples ``[k·S, (k+1)·S)`` of the source dataset (unflipped), raw latents of
each image and of its mirror, and labels. Shards are written atomically and carry their
encoder and source fingerprints, so an interrupted run resumes by skipping finished shards;
``manifest.json`` is written last. Per-channel statistics of all stored latents (both
variants) become the ``dataset`` normalisation.

``--teacher KIND`` also stores a frozen teacher's patch features of the original pixels
(``teacher``, and ``teacher_flip`` of the mirror) beside the latents, so REPA on latents needs
neither a VAE decode nor a teacher forward per step. Size: ``n · N_t · D_t`` numbers per
variant (20k shapes with the offline teacher: 20k × 64 × 64 × 4 B ≈ 330 MB per variant).

Every shard also stores each image's caption (and, for ``shapes``, the caption of its mirror),
so a text-conditioned run trains on the cache (:mod:`denoiselab.latents.captions`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader

from denoiselab.cliutil import ArgumentParser
from denoiselab.config import (
    ConfigError,
    apply_overrides,
    find_config,
    from_dict,
    load_yaml,
    to_dict,
)
from denoiselab.data import DataConfig, build_dataset
from denoiselab.encoders import ImageEncoder, TeacherConfig, build_teacher
from denoiselab.io import atomic_write, foreign_manifest, is_inside
from denoiselab.latents import captions as cap
from denoiselab.latents.autoencoders import Autoencoder, fingerprint, load_autoencoder
from denoiselab.latents.manifest import (
    CACHE_FORMAT,
    MANIFEST,
    STORE_DTYPES,
    CacheManifest,
    EncoderRecord,
    LatentCacheError,
    ShardRecord,
    write_manifest,
)
from denoiselab.latents.norm import LatentNorm


class _ChannelStats:
    """Streaming per-channel mean and std in float64 over ``[B, c, h, w]`` batches."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros(channels, dtype=torch.float64)

    def add(self, z: Tensor) -> None:
        z = z.detach().double().cpu()
        self.n += z.numel() // z.shape[1]
        self.s1 += z.sum(dim=(0, 2, 3))
        self.s2 += z.square().sum(dim=(0, 2, 3))

    def norm(self) -> LatentNorm:
        mean = self.s1 / self.n
        std = (self.s2 / self.n - mean.square()).clamp_min(1e-12).sqrt()
        return LatentNorm.from_values(mean, std, len(mean))


def encoder_record(ae: Autoencoder) -> EncoderRecord:
    """The identity of ``ae`` as stored in a manifest."""
    fp = fingerprint(ae.path) if ae.path else "identity"
    return EncoderRecord(ae.kind, ae.path, fp, ae.image_channels, ae.latent_channels, ae.downsample)


def _source_fingerprint(data: DataConfig) -> str:
    content = {
        k: v
        for k, v in to_dict(data).items()
        if k not in ("hflip", "num_workers", "prefetch_factor")
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def cache_latents(
    data: DataConfig,
    ae: Autoencoder,
    out: str | Path,
    *,
    batch_size: int = 64,
    flips: bool = True,
    shard_size: int = 8192,
    store_dtype: str = "float32",
    log: Any = None,
    teacher: ImageEncoder | None = None,
) -> CacheManifest:
    """Encode every image of ``data`` (unflipped, and mirrored if ``flips``) into ``out``;
    with ``teacher``, also store its patch features of the same pixels."""
    shape = _check_inputs(data, ae, store_dtype)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise ConfigError(f"cache-latents: {name}={value} must be >= 1")
    out = Path(out)
    _check_out(out, data)
    source = build_dataset(replace(data, hflip=False))
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the cache is incomplete until the end
    record, src_fp = encoder_record(ae), _source_fingerprint(data)
    captions = cap.caption_record(source, flips)
    if captions["missing"] and log:
        log(f"{captions['missing']} of {len(source)} images have no caption (stored as empty)")
    stats, shards, n = _ChannelStats(shape[0]), [], len(source)
    for k in range(math.ceil(n / shard_size)):
        shard = ShardRecord(f"shard_{k:05d}.safetensors", k * shard_size, 0)
        shard = replace(shard, count=min(shard_size, n - shard.start))
        meta = {
            "encoder": record.fingerprint,
            "source": src_fp,
            "start": str(shard.start),
            "count": str(shard.count),
            "flips": str(flips),
            "dtype": store_dtype,
            "teacher": json.dumps(teacher.identity() if teacher else None, sort_keys=True),
            "captions": _caption_digest(source, shard, captions["follow_flips"]),
        }
        tensors = _reuse(out / shard.file, meta)
        if tensors is None:
            tensors = _encode_range(
                source, ae, shard, batch_size, flips, data.resolved_num_workers, teacher,
                follow_flips=captions["follow_flips"],
            )  # fmt: skip
            tensors = {
                k_: v.to(STORE_DTYPES[store_dtype]) if v.is_floating_point() else v
                for k_, v in tensors.items()
            }
            _atomic_save(tensors, meta, out / shard.file)
        for name in ("latents", "latents_flip"):
            if name in tensors:
                stats.add(tensors[name])
        shards.append(shard)
        if log:
            log(f"shard {k}: images {shard.start}…{shard.start + shard.count - 1} → {shard.file}")
    manifest = CacheManifest(
        encoder=record,
        image_size=data.image_size,
        image_channels=data.channels,
        latent_shape=shape,
        num_images=n,
        num_classes=source.num_classes,
        class_names=list(source.class_names),
        flips=flips,
        source_hflip=data.resolved_hflip,
        source=to_dict(_absolute_root(data)),
        normalization={"autoencoder": ae.normalization(), "dataset": stats.norm()},
        shards=shards,
        dtype=store_dtype,
        extra={"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source_fingerprint": src_fp},
        teacher=teacher.identity() if teacher else None,
        captions=captions,
    )
    write_manifest(out, manifest)
    return manifest


def _check_inputs(data: DataConfig, ae: Autoencoder, store_dtype: str) -> tuple[int, int, int]:
    """The latent shape ``(c, h, w)``; clear errors for data the autoencoder cannot encode."""
    if data.name == "latents":
        raise ConfigError("cache-latents encodes pixel data; data.name='latents' is a cache")
    if data.channels != ae.image_channels:
        raise ConfigError(
            f"data.channels={data.channels} but the {ae.kind} autoencoder takes "
            f"{ae.image_channels}-channel images"
        )
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype={store_dtype!r}; valid: {', '.join(STORE_DTYPES)}")
    return ae.latent_shape(data.image_size)


def _absolute_root(data: DataConfig) -> DataConfig:
    """``data`` with an absolute ``root``: the manifest's source is read later (the pixel
    reference of a latent run's metrics) from wherever that process runs."""
    return replace(data, root=str(Path(data.root).resolve())) if data.root else data


def _check_out(out: Path, data: DataConfig) -> None:
    """Refuse an ``out`` inside the source data or holding other data: its ``manifest.json``
    is deleted first (the cache is incomplete until the end), which would ruin a prepared
    folder."""
    if is_inside(out, data.root):
        raise ConfigError(
            f"--out {str(out)!r} is in data.root, the data to encode (an image folder would "
            "take it for a class); choose a directory outside it"
        )
    foreign = foreign_manifest(out, MANIFEST, CACHE_FORMAT)
    if foreign:
        raise ConfigError(
            f"--out {str(out)!r} {foreign}, not a latent cache's: choose an empty directory "
            "or an earlier cache to resume"
        )


def _encode_range(
    source: Any,
    ae: Autoencoder,
    shard: ShardRecord,
    batch: int,
    flips: bool,
    workers: int,
    teacher: ImageEncoder | None = None,
    follow_flips: bool = False,
) -> dict[str, Tensor]:
    """``latents [n, c, h, w]``, ``latents_flip`` (if ``flips``), ``labels [n]`` and the packed
    captions (``caption_*``, and ``caption_flip_*`` where captions ``follow_flips``) of a
    shard, and with ``teacher`` its features ``teacher [n, N_t, D_t]`` (and ``teacher_flip``)."""
    indices = range(shard.start, shard.start + shard.count)
    with_captions = cap.WithCaptions(source, indices, follow_flips)
    loader = DataLoader(with_captions, batch_size=batch, num_workers=workers)
    parts: dict[str, list[Tensor]] = {}
    texts: dict[str, list[str]] = {"caption": [], "caption_flip": []}
    encoders = {"latents": ae.encode, "teacher": teacher} if teacher else {"latents": ae.encode}
    for x, y, caption, caption_flip in loader:
        texts["caption"] += caption
        texts["caption_flip"] += caption_flip
        for name, encode in encoders.items():
            parts.setdefault(name, []).append(encode(x).float().cpu())
            if flips:
                parts.setdefault(f"{name}_flip", []).append(encode(x.flip(-1)).float().cpu())
        parts.setdefault("labels", []).append(torch.as_tensor(y, dtype=torch.long))
    out = {name: torch.cat(chunks) for name, chunks in parts.items()}
    for name, captions in texts.items():
        if name == "caption" or follow_flips:
            out.update(cap.pack(captions, name))
    return out


def _caption_digest(source: Any, shard: ShardRecord, follow_flips: bool) -> str:
    """Fingerprint of a shard's captions: a finished shard is reused only if they are the same."""
    indices = range(shard.start, shard.start + shard.count)
    variants = (False, True) if follow_flips else (False,)
    return cap.digest([source.caption_variant(i, m) for m in variants for i in indices])


def _reuse(path: Path, meta: dict[str, str]) -> dict[str, Tensor] | None:
    """The tensors of an existing shard written with the same ``meta``, else ``None``."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}) != meta:
            return None
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a mapping


def _atomic_save(tensors: dict[str, Tensor], meta: dict[str, str], path: Path) -> None:
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, tmp, meta))


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="denoiselab cache-latents",
        description="Encode a pixel dataset once (with flipped variants) into a latent cache.",
    )
    p.add_argument(
        "config",
        help="YAML (or shipped config name) with a pixel `data:` section (any training "
        "config works) and optionally `autoencoder: PATH`",
    )
    p.add_argument("overrides", nargs="*", help="data.key=value overrides")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument(
        "--autoencoder",
        help="'identity', a `train-ae` directory, or a local "
        "diffusers AutoencoderKL / AutoencoderKLFlux2 directory",
    )
    p.add_argument(
        "--kind",
        choices=["identity", "tiny", "diffusers-kl", "flux2"],
        help="assert the autoencoder kind (default: detected)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=8192, help="images per shard")
    p.add_argument("--no-flips", action="store_true", help="do not store mirrored encodings")
    p.add_argument("--dtype", choices=list(STORE_DTYPES), default="float32", help="stored dtype")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--teacher",
        choices=["offline", "dinov2", "dinov3", "clip", "siglip"],
        help="also store this frozen teacher's patch features of the pixels (REPA on latents)",
    )
    p.add_argument("--teacher-path", help="local model directory of a transformers teacher")
    p.add_argument(
        "--teacher-resolution",
        type=int,
        help="teacher input side (default: DINOv2/v3 224, CLIP/SigLIP their own; the "
        "offline teacher runs at the data's side)",
    )
    return p


def cache_latents_main(argv: list[str] | None = None) -> int:
    """Entry point of ``denoiselab cache-latents`` (returns the exit status)."""
    args = _parser().parse_args(argv)
    try:
        raw = load_yaml(find_config(args.config))
        ae_path = args.autoencoder or raw.get("autoencoder")
        if not ae_path:
            raise ConfigError(
                f"no autoencoder: pass --autoencoder PATH or set `autoencoder:` in {args.config}"
            )
        data_raw = apply_overrides({"data": raw.get("data", {})}, args.overrides)
        data = from_dict(DataConfig, data_raw["data"], "data")
        from denoiselab.train.distributed import resolve_device

        device = resolve_device(args.device)  # a misspelt or missing device: a named error
        ae = load_autoencoder(ae_path, args.kind, device=device, image_channels=data.channels)
        teacher = None
        if args.teacher:
            tcfg = TeacherConfig(args.teacher, args.teacher_path, args.teacher_resolution)
            teacher = build_teacher(tcfg, data, device, key="teacher")
        start = time.perf_counter()
        m = cache_latents(
            data,
            ae,
            args.out,
            batch_size=args.batch,
            flips=not args.no_flips,
            shard_size=args.shard_size,
            store_dtype=args.dtype,
            log=lambda s: print(s, file=sys.stderr, flush=True),
            teacher=teacher,
        )
    except (ConfigError, LatentCacheError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"denoiselab cache-latents: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{m.num_images} images → {m.latent_shape} latents ({m.encoder.kind}, "
        f"{'with' if m.flips else 'no'} flips) in {time.perf_counter() - start:.1f}s → {args.out}"
    )
    return 0
