"""Latent spaces behind one autoencoder interface (identity for pixels)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Decoder = Callable[[Tensor], Tensor]


def decoder_for(data_cfg: object, device: torch.device | str = "cpu") -> Decoder:
    """What turns the model's data space back into ``[-1, 1]`` pixels for grids and metrics.

    Pixel datasets decode with the identity.
    """
    return lambda x: x
