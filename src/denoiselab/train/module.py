"""What a run trains, as one module: the network and the objective's loss terms.

Loss terms may own parameters (a REPA projector). Holding the network and the objective in
one ``nn.Module`` gives every trained parameter the same treatment without special cases:
DDP averages all their gradients, the optimizer, clipping and checkpoints see all of them,
and ``state_dict`` has one stable layout (``model.*``, ``objective.extra.<term>.*``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from denoiselab.objectives import DenoisingObjective


class TrainingModule(nn.Module):
    """``forward(x, y, generator, nimg=, extras=) -> {term: [B]}``: one objective evaluation.

    ``net`` is the callable the objective runs (the network itself, or a compiled view of
    it); it is kept outside the module tree so its parameters are not registered twice.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: DenoisingObjective,
        net: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.__dict__["net"] = model if net is None else net

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        *,
        nimg: int = 0,
        extras: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        return self.objective(self.net, x, y, generator, nimg=nimg, extras=extras)

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates, in registration order (network first)."""
        return [p for p in self.parameters() if p.requires_grad]

    def unused_term_parameters(self) -> list[str]:
        """Loss-term parameters that must get a gradient every step (``LossTerm.may_skip``
        False) but got none since the gradients were last cleared."""
        return [f"objective.{n}" for n, p in self.objective.required_parameters() if p.grad is None]
