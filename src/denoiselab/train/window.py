"""The loss terms accumulated between two log rows, and the first non-finite step.

Sums stay on the device (no host synchronisation per step). The window is part of the
resumable state: a checkpoint keeps the partial sums, so the first log row after a resume
equals the uninterrupted run's, whatever the log and checkpoint intervals.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from denoiselab.train.distributed import DistInfo, all_reduce_mean

_PREFIX = "window."


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the first such step."""


class NonFiniteGradientError(NonFiniteLossError):
    """A gradient became NaN or inf while the loss was finite; the message names the step.

    The run stops as for a non-finite loss (the update already applied may have poisoned the
    weights, so nothing after the last good checkpoint is saved) rather than skipping the step:
    without loss scaling (fp32/bf16) a non-finite gradient is a bug or a divergence to look at,
    not an overflow to ride out.
    """


class LossWindow:
    """``add(step, terms)`` after each step; ``means()`` at a log row, then ``reset()``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        # 1-based number of the first step whose loss (gradient) was not finite, -1 while
        # all were
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.first_bad_grad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, step: int, terms: dict[str, Tensor]) -> None:
        """Add the per-term means ``terms`` of step ``step`` (0-based)."""
        finite = torch.isfinite(loss_total(terms))  # the gradient is checked on its own
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step + 1, self.first_bad)
        for name, v in terms.items():
            self.sums[name] = self.sums.get(name, 0) + v
        self.count += 1

    def means(self, dist: DistInfo) -> dict[str, float]:
        """Per-term means over the window, averaged over ranks (a collective under DDP)."""
        return {k: all_reduce_mean(v / self.count, dist).item() for k, v in self.sums.items()}

    def running_loss(self) -> float:
        """Mean loss over the window so far, this rank (for the progress bar)."""
        return float(loss_total(self.sums)) / max(self.count, 1)

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def note_gradient(self, step: int, norm: Tensor) -> None:
        """Remember (on device, no host sync) whether step ``step``'s gradient norm is finite."""
        bad = self.first_bad_grad
        self.first_bad_grad = torch.where((bad < 0) & ~torch.isfinite(norm), step + 1, bad)

    def first_non_finite(self, dist: DistInfo, bad: Tensor | None = None) -> int:
        """The first step (1-based) whose loss (or ``bad``'s record) was not finite on any
        rank, or -1."""
        bad = self.first_bad if bad is None else bad
        if dist.enabled:
            big = torch.iinfo(torch.long).max
            bad = torch.where(bad < 0, big, bad)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
            bad = torch.where(bad == big, -1, bad)
        return int(bad.item())

    def check_finite(self, dist: DistInfo, global_batch: int, kept: object) -> None:
        """Raise :class:`NonFiniteLossError` if a loss so far was not finite on any rank, or
        :class:`NonFiniteGradientError` if a gradient was first (a collective under DDP;
        ``kept``: where the last good checkpoint is)."""
        bad = self.first_non_finite(dist)
        grad_bad = self.first_non_finite(dist, self.first_bad_grad)
        if grad_bad >= 0 and (bad < 0 or grad_bad < bad):
            raise NonFiniteGradientError(
                f"gradient is not finite at step {grad_bad} (after {grad_bad * global_batch} "
                f"images) while the loss was finite; stopped; the last good checkpoint in "
                f"{kept} is kept. Check custom loss terms, or try fp32, a lower learning rate "
                "or optim.grad_clip."
            )
        if bad >= 0:
            raise NonFiniteLossError(
                f"loss is not finite at step {bad} (after {bad * global_batch} images); "
                f"stopped; the last good checkpoint in {kept} is kept. "
                "Try a lower learning rate or optim.grad_clip."
            )

    # -- checkpoint ------------------------------------------------------------------------------
    def state(self, dist: DistInfo) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors ``window.<term>`` (``[world_size]``: every rank's sum, gathered — a
        collective under DDP) and JSON-able fields, to store in a checkpoint."""
        tensors = {}
        for name, v in self.sums.items():
            v = v.detach().reshape(1)
            if dist.enabled:
                parts = [torch.empty_like(v) for _ in range(dist.world_size)]
                torch.distributed.all_gather(parts, v)
                v = torch.cat(parts)
            tensors[_PREFIX + name] = v
        return tensors, {"count": self.count}

    def load(self, tensors: dict[str, Tensor], fields: dict[str, Any], dist: DistInfo) -> None:
        """Restore what :meth:`state` returned: this rank's own sums if the world size is
        unchanged, else their mean over the saved ranks (the next row's mean is then still
        the run's). Absent in older checkpoints: an empty window."""
        self.reset()
        for key, saved in tensors.items():
            if key.startswith(_PREFIX):
                per_rank = saved.reshape(-1)
                same = per_rank.numel() == dist.world_size
                value = per_rank[dist.rank] if same else per_rank.mean()
                self.sums[key[len(_PREFIX) :]] = value.to(self.device)
        self.count = int(fields.get("count", 0)) if self.sums else 0


def loss_total(terms: dict[str, Any]) -> Any:
    """The loss: the sum of the loss terms (the gradient norm is logged beside them)."""
    return sum(v for k, v in terms.items() if k != "grad_norm")
