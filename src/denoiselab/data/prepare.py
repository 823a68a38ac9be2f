"""``denoiselab prepare-data``: decode and centre-crop an imagefolder once, into uint8 shards.

The layout and its guarantees are :mod:`denoiselab.data.prepared`'s. The ``N`` source files
are cut into shards of ``--shard-size`` *files* (so a shard's extent does not depend on which
files turn out unreadable); worker processes decode shards in parallel. Each shard is
written to a temporary name and renamed, then its record (``progress/shard-<k>.json``: which
files were readable, their labels, the shard's SHA-256) is written the same way, so a run
that is interrupted keeps every finished shard and the next run with the same arguments
decodes only the rest. The source listing is recorded first (``progress/source.json``): a
source that changed in between is refused rather than mixed. ``manifest.json`` comes last.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from denoiselab.data.captions import index_captions
from denoiselab.data.imagefolder import ImageFolderError, decode_crop, find_images
from denoiselab.data.prepared import CAPTIONS, FORMAT, MANIFEST, PreparedDataError
from denoiselab.io import atomic_write, atomic_write_text, foreign_manifest, is_inside

_HASH_CHUNK = 1 << 24


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def _shard_name(k: int) -> str:
    return f"images-{k:05d}.npy"


def _decode_shard(
    out: str, k: int, files: list[tuple[str, int]], image_size: int, channels: int
) -> dict[str, Any]:
    """Decode one shard's files; write ``images-<k>.npy`` and then its record."""
    images, ok, bad = [], [], []
    for path, _ in files:
        try:
            images.append(decode_crop(path, image_size, channels))
            ok.append(True)
        except Exception as err:  # the imagefolder skips the same files (same decoder)
            ok.append(False)
            bad.append(
                f"{path}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}"
            )
    shape = (len(images), image_size, image_size, channels)
    array = np.stack(images) if images else np.zeros(shape, dtype=np.uint8)
    folder = Path(out)
    _save_npy(folder / _shard_name(k), array)
    record = {
        "file": _shard_name(k),
        "count": len(images),
        "ok": ok,
        "labels": [label for (_, label), good in zip(files, ok) if good],
        "bad": bad,
        "sha256": _sha256(folder / _shard_name(k)),
    }
    atomic_write_text(folder / "progress" / f"shard-{k:05d}.json", json.dumps(record))
    return record


def _done(out: Path, k: int) -> dict[str, Any] | None:
    """The record of shard ``k`` if it was finished (record and shard file both present)."""
    rec = out / "progress" / f"shard-{k:05d}.json"
    if not rec.is_file() or not (out / _shard_name(k)).is_file():
        return None
    try:
        return json.loads(rec.read_text())
    except ValueError:  # unreadable (a damaged disk): decode the shard again
        return None


def _check_out(out: Path, source: Path) -> None:
    """Refuse an ``out`` inside the image folder (its folders would become classes of the
    source) or holding another kind of ``manifest.json`` (a latent cache)."""
    if is_inside(out, source):
        raise PreparedDataError(
            f"--out {str(out)!r} is inside the image folder {str(source)!r}: its files would "
            "become part of the data; choose a directory outside it"
        )
    foreign = foreign_manifest(out, MANIFEST, FORMAT)
    if foreign:
        raise PreparedDataError(
            f"--out {str(out)!r} {foreign}, not a prepared folder's: choose an empty "
            "directory (or an earlier prepared folder to resume)"
        )


def _check_source(out: Path, listing: dict[str, Any]) -> None:
    """Record the source listing, or refuse a source that changed since the last run."""
    path = out / "progress" / "source.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != listing:
            changed = [k for k in listing if old.get(k) != listing[k]]
            raise PreparedDataError(
                f"{out} was started from another source or settings ({', '.join(changed)} "
                "changed): delete it or use another --out"
            )
    else:
        atomic_write_text(path, json.dumps(listing))


def prepare(
    source: str | Path,
    out: str | Path,
    *,
    image_size: int,
    channels: int = 3,
    shard_size: int = 2048,
    workers: int = 1,
    log: Any = None,
) -> dict[str, Any]:
    """Write the prepared folder ``out`` for imagefolder ``source``; returns its manifest.
    Resumes an interrupted run; a complete ``out`` with the same settings is left as is."""
    say = log or (lambda message: None)
    out = Path(out)
    class_names, samples = find_images(source)
    listing_hash = hashlib.sha256(
        json.dumps([(str(Path(p).relative_to(source)), lab) for p, lab in samples]).encode()
    ).hexdigest()
    listing = {
        "source": str(Path(source).resolve()),
        "files_sha256": listing_hash,
        "num_files": len(samples),
        "image_size": image_size,
        "channels": channels,
        "shard_size": shard_size,
    }
    _check_out(out, Path(source))
    (out / "progress").mkdir(parents=True, exist_ok=True)
    _check_source(out, listing)
    if (out / MANIFEST).is_file():
        say(f"{out} is complete")
        return json.loads((out / MANIFEST).read_text())
    chunks = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for k, files in enumerate(chunks):
        rec = _done(out, k)
        if rec is not None and len(rec["ok"]) == len(files):
            records[k] = rec
        else:
            todo.append(k)
    if records:
        say(f"resuming: {len(records)} of {len(chunks)} shards already written")
    tic = time.perf_counter()
    args = [(str(out), k, chunks[k], image_size, channels) for k in todo]
    if workers <= 1:
        for a in args:
            records[a[1]] = _decode_shard(*a)
            say(f"shard {a[1] + 1}/{len(chunks)}")
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_decode_shard, *a): a[1] for a in args}
            for done, future in enumerate(futures, 1):
                records[futures[future]] = future.result()
                say(f"shard {done}/{len(todo)} of this run")
    decoded = sum(len(chunks[k]) for k in todo)
    if todo:
        rate = decoded / max(time.perf_counter() - tic, 1e-9)
        say(f"decoded {decoded} files in {time.perf_counter() - tic:.1f}s ({rate:.0f} files/s)")
    records_in_order = [records[k] for k in range(len(chunks))]
    return _finish(out, listing, class_names, records_in_order, source, samples)


def _write_captions(
    out: Path, source: str | Path, samples: list[tuple[str, int]], ok: np.ndarray
) -> dict[str, Any]:
    """``captions.json`` (the caption of each stored image, as the imagefolder reads it) and
    its manifest entries, where the folder has caption files; ``{}`` where it has none (the
    class names are the captions then, as in the imagefolder)."""
    paths = [os.path.normpath(path) for path, _ in samples]
    index = index_captions(str(source), paths)
    if index.empty:
        return {}
    kept = [path for path, good in zip(paths, ok) if good]
    atomic_write_text(out / CAPTIONS, json.dumps([index.caption(p) for p in kept]))
    return {
        "captions_sha256": _sha256(out / CAPTIONS),
        "missing_captions": sum(not index.has_caption(p) for p in kept),
    }


def _finish(
    out: Path,
    listing: dict[str, Any],
    class_names: list[str],
    records: list[dict[str, Any]],
    source: str | Path,
    samples: list[tuple[str, int]],
) -> dict[str, Any]:
    """``labels.npy``, ``index.npy``, ``captions.json`` (captioned folders) and the manifest,
    from the shard records."""
    ok = np.array([good for r in records for good in r["ok"]], dtype=bool)
    readable = np.flatnonzero(ok)
    if readable.size == 0:
        bad = [b for r in records for b in r["bad"]]
        raise ImageFolderError(
            f"imagefolder root {listing['source']!r}: none of its {len(ok)} image files could "
            f"be decoded (last: {bad[-1] if bad else '?'}); check the data"
        )
    # file i yields the next readable file at or after i, wrapping round (as imagefolder)
    index = np.searchsorted(readable, np.arange(len(ok)))
    index[index == readable.size] = 0
    labels = np.array([lab for r in records for lab in r["labels"]], dtype=np.int64)
    _save_npy(out / "index.npy", index.astype(np.int64))
    _save_npy(out / "labels.npy", labels)
    shards = [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]} for r in records]
    captions = _write_captions(out, source, samples, ok)
    parts = {
        "shards": [s["sha256"] for s in shards],
        "labels": _sha256(out / "labels.npy"),
        "index": _sha256(out / "index.npy"),
        **({"captions": captions["captions_sha256"]} if captions else {}),
    }
    manifest = {
        "format": FORMAT,
        **listing,
        "num_images": int(readable.size),
        "class_names": class_names,
        "shards": shards,
        "labels_sha256": parts["labels"],
        "index_sha256": parts["index"],
        **captions,
        "bad_files": [b for r in records for b in r["bad"]],
        "content_hash": hashlib.sha256(json.dumps(parts).encode()).hexdigest(),
        "crop": "ADM centre crop (BOX halving, BICUBIC resize), denoiselab.data.imagefolder",
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(out: str | Path) -> list[str]:
    """Files of a prepared folder whose SHA-256 differs from the manifest's (empty: intact)."""
    from denoiselab.data.prepared import read_manifest

    out = Path(out)
    m = read_manifest(out)
    bad = [s["file"] for s in m["shards"] if _sha256(out / s["file"]) != s["sha256"]]
    files = [("labels.npy", "labels_sha256"), ("index.npy", "index_sha256")]
    files += [(CAPTIONS, "captions_sha256")] if "captions_sha256" in m else []
    for name, key in files:
        if _sha256(out / name) != m[key]:
            bad.append(name)
    return bad


def prepare_main(argv: Sequence[str] | None = None) -> int:
    """``denoiselab prepare-data SRC --out DIR --image-size S``."""
    from denoiselab.cliutil import ArgumentParser
    from denoiselab.data.config import cores_per_rank

    p = ArgumentParser(
        prog="denoiselab prepare-data",
        description="Decode and centre-crop an image folder once into memory-mapped uint8 "
        "shards (train on it with data.name=prepared, data.root=OUT); resumes if interrupted.",
    )
    p.add_argument("source", help="image folder: SOURCE/<class>/*.jpg (ImageNet: train/)")
    p.add_argument("--out", required=True, help="prepared folder to write")
    p.add_argument("--image-size", type=int, required=True, help="training resolution S")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--shard-size", type=int, default=2048, help="source files per shard")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (all cores)")
    p.add_argument("--verify", action="store_true", help="only re-hash a prepared folder")
    args = p.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.verify:
        bad = verify(args.out)
        print(f"{args.out}: " + ("intact" if not bad else f"{len(bad)} file(s) differ: {bad}"))
        return 0 if not bad else 1
    if args.shard_size < 1 or not 8 <= args.image_size <= 1024:
        p.error("--shard-size must be >= 1 and --image-size in 8 … 1024")
    m = prepare(args.source, args.out, image_size=args.image_size, channels=args.channels,
                shard_size=args.shard_size, workers=args.workers or cores_per_rank(), log=say)  # fmt: skip
    print(f"{args.out}: {m['num_images']} images ({len(m['bad_files'])} unreadable skipped) "
          f"in {len(m['shards'])} shards, content {m['content_hash'][:16]}")  # fmt: skip
    return 0
