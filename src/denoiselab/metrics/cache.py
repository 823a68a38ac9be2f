"""Content-hashed cache files for probes and reference statistics (atomic writes).

Cache root: the ``cache_dir`` argument, else ``$DENOISELAB_CACHE``, else
``~/.cache/denoiselab``. Probes live in ``<root>/probes``, reference statistics in
``<root>/reference``, and pretrained extractors are looked up in ``<root>/extractors``.
A file name is a prefix plus the SHA-256 of the canonical JSON of everything that
determines its content, so a changed recipe can never reuse a stale file.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from denoiselab.io import atomic_write

__all__ = ["atomic_write", "cache_root", "content_hash", "data_key", "to_jsonable"]

CACHE_ENV = "DENOISELAB_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The denoiselab cache root: ``cache_dir``, else ``$DENOISELAB_CACHE``, else ``~/.cache/denoiselab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "denoiselab"


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, paths, tuples and numpy scalars as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(
        f"cannot hash a value of type {type(value).__name__} into a cache key: {value!r}"
    )


def data_key(dataset_cfg: Any) -> Any:
    """``dataset_cfg`` as a cache key: a relative ``root`` made absolute (the datasets read it
    relative to the working directory, so ``root: data`` names another folder from each)."""
    value = to_jsonable(dataset_cfg)
    root = value.get("root") if isinstance(value, dict) else None
    if isinstance(root, str) and not os.path.isabs(root):
        value = {**value, "root": os.path.abspath(root)}
    return value


def content_hash(payload: Any, length: int = 16) -> str:
    """First ``length`` hex digits of SHA-256 over the canonical (sorted-key) JSON of ``payload``."""
    text = json.dumps(to_jsonable(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
