"""Generator of the toy experiment (seeds/003 §3.3, Fig. 2): a 5-layer ReLU MLP, 256 wide.

The data live on a d-dim subspace of a D-dim space; with D = 512 the 256-wide MLP is
under-complete, which only x-prediction survives. Time convention: t = 1 is data.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn


class ToyMLP(nn.Module):
    """ReLU MLP ``(z [B, D], t [B]) -> [B, D]`` with ``depth`` linear layers.

    t is appended to z as one extra input feature; the output is the raw network output
    (its meaning — x, ε or v — is the objective's business).
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 5) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 2:
            raise ValueError(
                f"ToyMLP needs dim >= 1, hidden >= 1 and depth >= 2, "
                f"got dim={dim}, hidden={hidden}, depth={depth}"
            )
        widths = [dim + 1] + [hidden] * (depth - 1) + [dim]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(w_in, w_out))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        """z: [B, D], t: [B] -> [B, D]."""
        return self.net(torch.cat([z, t.to(z.dtype)[:, None]], dim=-1))
