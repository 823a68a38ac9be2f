"""Cached text embeddings: a frozen encoder's output for every caption of the data, stored once
so that training reads it instead of running the encoder each step (issue 17 §2).

``denoiselab cache-text CONFIG --out DIR`` (a training config with ``model.text.encoder`` t5,
clip or auto) writes::

    DIR/text.json                 written last (atomically): its presence means complete
    DIR/text_00000.safetensors    tokens [n, L, D_text] (float16/bfloat16/float32), mask uint8 [n, L]
                                  (captions that follow flips) tokens_flip, mask_flip

``tokens[i]`` is ``FrozenTextEncoder(tokenizer([caption_variant(i, False)]))[0]``: the encoder's
last hidden state, 0 at padding; ``mask[i] = ids >= 0``. Each image has one caption per flip
variant (``shapes`` draws one phrasing per image and swaps left/right on a mirror), so the cache
stores every caption training can meet: the un-flipped one, and the mirrored one where it differs.
``text.json`` records the encoder (kind, resolved path, a fingerprint of its files), ``max_len``,
``dim``, the dtype and a digest of the captions: a run whose ``model.text`` or data differ gets
a :class:`TextCacheError` naming the mismatch. Training with ``model.text.cache: DIR`` hands the
network ``[L, D_text + 1]`` per sample (tokens, then the mask as a last channel; see
:meth:`~denoiselab.models.text_jit.TextConditioner.encode`).
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from denoiselab.config import ConfigError
from denoiselab.encoders.hf import weights_fingerprint
from denoiselab.io import atomic_write, atomic_write_text
from denoiselab.latents.captions import digest
from denoiselab.latents.manifest import STORE_DTYPES
from denoiselab.text.config import TextConfig

MANIFEST = "text.json"
FORMAT, VERSION = "denoiselab-text-embeddings", 1
DTYPES = STORE_DTYPES  # the latent cache's stored dtypes


class TextCacheError(ConfigError):
    """A text-embedding cache is missing, incomplete, or made for another encoder or data."""


def caption_variants(dataset: Any) -> tuple[list[str], list[str] | None]:
    """Every caption of ``dataset`` un-flipped, and mirrored if they follow flips (else None)."""
    n = len(dataset)
    plain = [dataset.caption_variant(i, False) for i in range(n)]
    if not (dataset.hflip and dataset.captions_follow_flips):
        return plain, None
    return plain, [dataset.caption_variant(i, True) for i in range(n)]


def encoder_record(text: TextConfig) -> dict[str, Any]:
    """What identifies the embeddings of ``text`` (a resolved transformers ``model.text``)."""
    path = Path(str(text.path)).expanduser().resolve()
    return {
        "encoder": text.encoder,
        "path": str(path),
        "fingerprint": weights_fingerprint(path),
        "max_len": text.max_len,
        "dim": text.dim,
    }


@torch.no_grad()
def cache_text(
    dataset: Any,
    text: TextConfig,
    out: str | Path,
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    shard_size: int = 65536,
    device: str = "cpu",
    log: Any = None,
) -> dict[str, Any]:
    """Encode every caption of ``dataset`` with the frozen encoder of ``text`` into ``out``."""
    from safetensors.torch import save_file

    from denoiselab.text import tokenizer_for
    from denoiselab.text.hf import load_text_encoder

    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise TextCacheError(f"cache-text: {name}={value} must be >= 1")
    if text.encoder == "words" or not text.resolved:
        raise TextCacheError(
            f"cache-text needs a resolved transformers model.text (encoder t5, clip or auto), "
            f"got encoder={text.encoder!r}: the offline 'words' table is trained, not frozen"
        )
    if dtype not in DTYPES:
        raise TextCacheError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the end
    tokenize, encoder = tokenizer_for(text), load_text_encoder(text).to(device).eval()
    plain, mirrored = caption_variants(dataset)
    variants = {"": plain, **({"_flip": mirrored} if mirrored is not None else {})}
    shards = []
    for k in range(math.ceil(len(plain) / shard_size)):
        lo, hi = k * shard_size, min(len(plain), (k + 1) * shard_size)
        tensors = {}
        for suffix, captions in variants.items():
            toks, masks = [], []
            for b in range(lo, hi, batch_size):
                ids = tokenize(captions[b : min(hi, b + batch_size)]).to(device)
                toks.append(encoder(ids).to(DTYPES[dtype]).cpu())
                masks.append((ids >= 0).to(torch.uint8).cpu())
            tensors[f"tokens{suffix}"], tensors[f"mask{suffix}"] = torch.cat(toks), torch.cat(masks)
        name = f"text_{k:05d}.safetensors"
        atomic_write(out / name, lambda tmp, tensors=tensors: save_file(tensors, tmp))
        shards.append({"file": name, "start": lo, "count": hi - lo})
        if log:
            log(f"shard {k}: captions {lo}…{hi - 1} → {name}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **encoder_record(text),
        "dtype": dtype,
        "num_images": len(plain),
        "flips": mirrored is not None,
        "captions": digest(plain + (mirrored or [])),
        "shards": shards,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


class TextEmbeddings:
    """A cache opened for ``text`` and ``dataset``: ``get(i, mirrored) -> float32 [L, D + 1]``.

    Opening checks the encoder record and the captions against the run: a mismatch is a
    :class:`TextCacheError` naming the key, the cache's value and the run's."""

    def __init__(self, root: str | Path, text: TextConfig, dataset: Any) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise TextCacheError(
                f"model.text.cache={str(root)!r} holds no {MANIFEST}: create it with "
                "`denoiselab cache-text CONFIG --out DIR` (an interrupted run leaves none)"
            )
        m = self.manifest = json.loads(path.read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise TextCacheError(f"{str(path)!r} is not a {FORMAT!r} v{VERSION} manifest")
        run = encoder_record(text)
        for key in ("encoder", "path", "fingerprint", "max_len", "dim"):
            if m[key] != run[key]:
                raise TextCacheError(
                    f"model.text.cache={str(root)!r} was encoded with {key}={m[key]!r} but this "
                    f"run's text encoder has {key}={run[key]!r}: re-run `denoiselab cache-text` "
                    "for this encoder, or set model.text to the one the cache was made with"
                )
        plain, mirrored = caption_variants(dataset)
        if m["num_images"] != len(plain) or m["captions"] != digest(plain + (mirrored or [])):
            raise TextCacheError(
                f"model.text.cache={str(root)!r} holds embeddings of {m['num_images']} other "
                f"captions than this run's {len(plain)} images (data or caption files changed, "
                "or hflip differs); re-run `denoiselab cache-text`"
            )
        self.flips = bool(m["flips"])
        self._starts = [s["start"] for s in m["shards"]]
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # open handles do not cross processes
        return {**self.__dict__, "_handles": {}}

    def get(self, index: int, mirrored: bool = False) -> Tensor:
        """``[L, D + 1]`` float32: the encoder's tokens of caption ``index`` (its mirrored
        variant if asked and stored), then the mask (1 = token, 0 = padding)."""
        k = bisect.bisect_right(self._starts, index) - 1
        if k not in self._handles:
            self._handles[k] = safe_open(self.root / self.manifest["shards"][k]["file"], "pt")
        f, j, suffix = self._handles[k], index - self._starts[k], "_flip" if mirrored else ""
        tokens = f.get_slice(f"tokens{suffix}")[j].float()
        mask = f.get_slice(f"mask{suffix}")[j].float()
        return torch.cat([tokens, mask[:, None]], dim=1)
