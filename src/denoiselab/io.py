"""Atomic file writes (what is already on disk is never replaced by a half-written file), and
the output-folder checks of the commands that write data sets and caches."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it into place.

    A crash or kill at any moment leaves either the old file or the new one, never a mix;
    the temporary file is removed on failure. Concurrent writers of the same content simply
    replace each other.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared caches from others
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def foreign_manifest(out: str | Path, manifest: str, fmt: str) -> str | None:
    """Why ``out`` must not be written as a ``fmt`` folder (None: it may): it holds a
    ``manifest`` JSON of another ``format`` (another kind of data that writing over would
    ruin)."""
    path = Path(out) / manifest
    if not path.is_file():
        return None
    try:
        kind = json.loads(path.read_text()).get("format")
    except (ValueError, AttributeError):
        kind = None
    return None if kind == fmt else f"holds a {manifest} of format {kind!r}"


def is_inside(out: str | Path, root: str | Path | None) -> bool:
    """Whether ``out`` is ``root`` or lies inside it (both resolved; no ``root``: False)."""
    return root is not None and Path(out).resolve().is_relative_to(Path(root).resolve())
