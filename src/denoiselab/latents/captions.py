"""Captions in a latent cache: each image's caption stored beside its latents.

A shard holds its captions as UTF-8 bytes with offsets (safetensors stores tensors only):
``caption_bytes uint8 [total]`` and ``caption_offsets int64 [n + 1]`` (caption ``j`` of the
shard is ``bytes[offsets[j]:offsets[j + 1]]``); for data whose captions follow flips
(``shapes`` says left or right), ``caption_flip_bytes`` / ``caption_flip_offsets`` hold the
caption of each mirrored image, the one ``latents_flip`` encodes.

The captions are the ones the pixel dataset gives (``dataset.caption_variant(i, mirrored)``),
read in the process that loads the image, after loading it: an unreadable imagefolder file is
replaced by the next readable one, and its caption with it. The manifest's ``captions`` record
says where they came from (``source``: an imagefolder's ``files`` or ``class names``;
``dataset`` otherwise), how many images had none (``missing``, as the imagefolder counts them)
and whether they follow flips.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

NAMES = ("caption", "caption_flip")  # stored under f"{name}_bytes" / f"{name}_offsets"


def pack(captions: Sequence[str], name: str = "caption") -> dict[str, Tensor]:
    """``{f"{name}_bytes": uint8 [total], f"{name}_offsets": int64 [n + 1]}`` of ``captions``."""
    data = [c.encode("utf-8") for c in captions]
    offsets = torch.zeros(len(data) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in data], dtype=torch.long), 0)
    blob = torch.frombuffer(bytearray(b"".join(data)), dtype=torch.uint8) if offsets[-1] else None
    return {
        f"{name}_bytes": blob.clone() if blob is not None else torch.zeros(0, dtype=torch.uint8),
        f"{name}_offsets": offsets,
    }


def read_one(handle: Any, offsets: Tensor, j: int, name: str = "caption") -> str:
    """Caption ``j`` of an open shard (``handle``: ``safe_open``), ``offsets`` its offsets."""
    a, b = int(offsets[j]), int(offsets[j + 1])
    if a == b:
        return ""
    return bytes(handle.get_slice(f"{name}_bytes")[a:b].numpy().tobytes()).decode("utf-8")


def digest(captions: Sequence[str]) -> str:
    """A short fingerprint of ``captions`` (a shard is re-encoded when its captions change)."""
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def caption_record(source: Any, flips: bool) -> dict[str, Any]:
    """The manifest's ``captions`` entry for the pixel dataset ``source``."""
    return {
        "source": getattr(source, "caption_source", "dataset"),
        "missing": int(getattr(source, "missing_captions", 0)),
        "follow_flips": bool(flips and source.captions_follow_flips),
    }


class WithCaptions(Dataset):
    """``source[i]`` as ``(image, label, caption, caption of the mirrored image)``, the
    captions read after the image (module docstring); the mirrored one only where
    ``follow_flips`` (else ``""``: it would be the same caption, read twice)."""

    def __init__(self, source: Any, indices: range, follow_flips: bool) -> None:
        self.source, self.indices, self.follow_flips = source, indices, follow_flips

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Tensor, int, str, str]:
        i = self.indices[j]
        x, y = self.source[i]
        mirrored = self.source.caption_variant(i, True) if self.follow_flips else ""
        return x, y, self.source.caption_variant(i, False), mirrored
