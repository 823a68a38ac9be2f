"""Working with the ecosystem: official JiT checkpoints in, shareable models out.

- :mod:`.official_layout`: the official JiT network's parameter names and layout ⇄ denoiselab's
  (pure functions of state dicts; every mismatch is a :class:`ConvertError` naming the key).
- :mod:`.jit_official`: ``denoiselab convert jit-official CKPT.pth --out RUN``.
- :mod:`.export`: ``denoiselab export RUN --out DIR`` (weights, ``config.json``, model card,
  ``--push-to-hub``).
- :mod:`.pretrained`: ``denoiselab.from_pretrained(DIR or hub id)`` → a model that samples.
"""

from __future__ import annotations


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the key or value at fault."""


__all__ = ["ConvertError"]
