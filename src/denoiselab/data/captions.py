"""Captions of an image folder, in the layouts text-to-image data sets use.

- ``metadata.jsonl`` (the Hugging Face ``imagefolder`` convention): one JSON object per line,
  ``{"file_name": "0001.png", "text": "a cat on a sofa"}`` (the key ``caption`` is accepted
  for ``text``); ``file_name`` is relative to the folder of the metadata file, and a tree may
  hold one metadata file per folder.
- Sidecar text files: ``0001.txt`` beside ``0001.png`` holds its caption (UTF-8, stripped).

A ``metadata.jsonl`` entry wins over a sidecar file. A line that is not a JSON object with a
string ``file_name`` (or whose text is not a string) is a :class:`CaptionError` naming the
file and line: a broken caption file is fixed before training, not discovered in the
samples. Images with neither are counted by the dataset, never an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

METADATA_NAME = "metadata.jsonl"
TEXT_KEYS = ("text", "caption")
_EXAMPLE = '{"file_name": "0001.png", "text": "a cat on a sofa"}'


class CaptionError(ValueError):
    """A caption file that cannot be read (names the file and the line)."""


@dataclass
class CaptionIndex:
    """Where each image's caption comes from (paths normalised with ``os.path.normpath``).

    ``metadata``: ``{image path: caption}`` from ``metadata.jsonl`` files; ``sidecars``: the
    set of ``.txt`` files in the tree (read when asked for); ``unmatched``: metadata entries
    naming no image of the data set; ``files``: the metadata files read.
    """

    metadata: dict[str, str | None] = field(default_factory=dict)
    sidecars: set[str] = field(default_factory=set)
    unmatched: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """No caption file at all (the dataset then captions with class names)."""
        return not self.files and not self.sidecars

    def has_caption(self, image: str) -> bool:
        if self.metadata.get(image) is not None:
            return True
        return _sidecar(image) in self.sidecars

    def caption(self, image: str) -> str:
        """The caption of ``image`` (a normalised path), or ``""`` when it has none."""
        text = self.metadata.get(image)
        if text is not None:
            return text
        sidecar = _sidecar(image)
        if sidecar not in self.sidecars:
            return ""
        with open(sidecar, encoding="utf-8") as f:
            return f.read().strip()


def _sidecar(image: str) -> str:
    return os.path.splitext(image)[0] + ".txt"


def index_captions(root: str | os.PathLike[str], images: Iterable[str]) -> CaptionIndex:
    """Find every ``metadata.jsonl`` and ``.txt`` file under ``root`` (following links, as the
    image search does) and match the metadata entries to ``images``."""
    index = CaptionIndex()
    for dirpath, _, names in sorted(os.walk(root, followlinks=True)):
        for name in sorted(names):
            path = os.path.normpath(os.path.join(dirpath, name))
            if name == METADATA_NAME:
                index.files.append(path)
                index.metadata.update(read_metadata(path))
            elif name.lower().endswith(".txt"):
                index.sidecars.add(path)
    known = {os.path.normpath(p) for p in images}
    index.unmatched = sorted(p for p in index.metadata if p not in known)
    return index


def read_metadata(path: str) -> dict[str, str | None]:
    """``{normalised image path: caption or None}`` of one ``metadata.jsonl`` file."""
    folder, entries = os.path.dirname(path), {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise CaptionError(
                    f"{where}: invalid JSON ({err.msg}); each line of {METADATA_NAME} must be "
                    f"an object like {_EXAMPLE}"
                ) from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise CaptionError(
                    f"{where}: {line.strip()[:80]!r} has no string 'file_name'; expected an "
                    f"object like {_EXAMPLE}"
                )
            key = next((k for k in TEXT_KEYS if entry.get(k) is not None), None)
            text = entry.get(key) if key else None
            if text is not None and not isinstance(text, str):
                raise CaptionError(
                    f"{where}: {key}={text!r} is not a string; expected an object like {_EXAMPLE}"
                )
            entries[os.path.normpath(os.path.join(folder, entry["file_name"]))] = text
    return entries
