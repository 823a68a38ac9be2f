"""Loading files that a user points at, without ever unpickling them.

Unpickling runs whatever code the file names, so a checkpoint, cache or weights file from
someone else must never go through ``pickle``. denoiselab reads user paths only as:

- safetensors (checkpoints, latent caches, the probe, the tiny autoencoder, diffusers and
  transformers weights via ``use_safetensors=True``);
- ``np.load(..., allow_pickle=False)`` (reference statistics);
- JSON / ``yaml.safe_load`` (configs, manifests, results);
- :func:`load_torch_tensors` for the one ``.pth`` format an ecosystem file uses (the
  TF-Inception weights): ``torch.load(weights_only=True)``, which refuses any object that is
  not a tensor or plain container, and a named :class:`UnsafeFileError` instead.

``tests/test_no_pickle.py`` feeds a malicious pickle to every such loader and scans the
sources for other ways in.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor


class UnsafeFileError(ValueError):
    """A file that is not plain tensors (loading it would need pickle, i.e. running code)."""


def load_torch_tensors(path: str | Path) -> dict[str, Tensor]:
    """``{name: tensor}`` from a ``torch.save`` file, read with ``weights_only=True``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"{str(path)!r} refused: it holds pickled objects other than tensors, and loading "
            f"them could run code ({first}); use safetensors or a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UnsafeFileError(f"{str(path)!r} is not a readable torch weights file ({e})") from None
    if not (isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values())):
        raise UnsafeFileError(
            f"{str(path)!r} is not a state dict of tensors ({type(obj).__name__})"
        )
    return obj


@contextlib.contextmanager
def torch_load_returns(obj: Any) -> Iterator[None]:
    """Inside the block ``torch.load`` returns ``obj`` without reading anything: for a library
    that insists on loading a path itself, after :func:`load_torch_tensors` read it safely
    (the file is read once, and never unpickled by the library)."""
    with mock.patch.object(torch, "load", lambda *args, **kwargs: obj):
        yield
