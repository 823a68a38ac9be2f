"""A network's condition and its *null*: the unconditional input that label dropout trains and
classifier-free guidance subtracts, defined here once for both.

A run's kind is chosen once where the run is built (:func:`condition_for` of its network
config) and handed to the objective (``DenoisingObjective.draw``: dropped rows become the null)
and to the sampler (``ClassifierFreeGuidance``: the unconditional branch gets the null), so the
null that training teaches is the null that sampling subtracts:

* :class:`ClassLabels`: class labels ``int64 [B]``; null ``num_classes`` (the null row of
  :class:`~denoiselab.models.layers.ClassEmbedder`).
* :class:`TextPrompts`: token ids ``int64 [B, L]``, null all ``PAD`` (the empty prompt); or
  cached embeddings ``float [B, L, D + 1]``, null zeros (the encoder's output for the empty
  prompt: tokens 0 at padding, mask channel 0).

A text run meets both of its forms: training on ``model.text.cache`` reads embeddings
(:mod:`denoiselab.text.embed_cache`), sampling tokenises prompts. A kind answers only for the
null; the network (:class:`~denoiselab.models.text_jit.TextConditioner`) is what reads ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from denoiselab.text.config import PAD

if TYPE_CHECKING:
    from denoiselab.models.jit import JiTConfig


class Condition(Protocol):
    """What a condition kind answers: is ``y`` of this kind, and what is its null."""

    def accepts(self, y: Tensor) -> bool: ...

    def null_like(self, y: Tensor) -> Tensor:
        """The unconditional input, shaped, typed and placed like ``y``."""
        ...

    def valid(self) -> str:
        """The conditions this kind takes, in words, for error messages."""
        ...


def _refuse(y: Tensor, valid: str) -> ValueError:
    return ValueError(
        f"a condition y of shape {list(y.shape)} ({y.dtype}) has no null input for label "
        f"dropout or CFG; valid: {valid}"
    )


@dataclass(frozen=True)
class ClassLabels:
    """Class labels ``int64 [B]`` in ``0 … num_classes − 1``; the null is ``num_classes``."""

    num_classes: int

    def accepts(self, y: Tensor) -> bool:
        return y.dim() == 1 and not y.is_floating_point()

    def null_like(self, y: Tensor) -> Tensor:
        if not self.accepts(y):
            raise _refuse(y, self.valid())
        return torch.full_like(y, self.num_classes)

    def valid(self) -> str:
        return f"class labels int64 [B] (null: class {self.num_classes})"


@dataclass(frozen=True)
class TextPrompts:
    """Token ids ``int64 [B, L]`` (null: all ``PAD``, the empty prompt) or the encoder's output
    already computed, ``float [B, L, D + 1]`` (null: zeros, what the encoder gives for the
    empty prompt). ``max_len`` (``L``) and ``dim`` (``D``): 0 leaves them unchecked."""

    max_len: int = 0
    dim: int = 0

    def _ids(self, y: Tensor) -> bool:
        return y.dim() == 2 and not y.is_floating_point() and self.max_len in (0, y.shape[1])

    def _embeddings(self, y: Tensor) -> bool:
        return (
            y.dim() == 3
            and y.is_floating_point()
            and self.max_len in (0, y.shape[1])
            and self.dim in (0, y.shape[2] - 1)
        )

    def accepts(self, y: Tensor) -> bool:
        return self._ids(y) or self._embeddings(y)

    def null_like(self, y: Tensor) -> Tensor:
        if self._ids(y):
            return torch.full_like(y, PAD)
        if self._embeddings(y):
            return torch.zeros_like(y)
        raise _refuse(y, self.valid())

    def valid(self) -> str:
        length = self.max_len or "L"
        width = self.dim + 1 if self.dim else "D + 1"
        return (
            f"token ids int64 [B, {length}] (null: all PAD = {PAD}, the empty prompt) or cached "
            f"text embeddings float [B, {length}, {width}] (null: zeros)"
        )


@dataclass(frozen=True)
class ByShape:
    """The kind when no network config says it (an objective or sampler built from a class
    count alone, as tools and tests do): class labels or text prompts, told by ``y``'s shape."""

    num_classes: int

    def kinds(self) -> tuple[Condition, ...]:
        return ClassLabels(self.num_classes), TextPrompts()

    def accepts(self, y: Tensor) -> bool:
        return any(kind.accepts(y) for kind in self.kinds())

    def null_like(self, y: Tensor) -> Tensor:
        for kind in self.kinds():
            if kind.accepts(y):
                return kind.null_like(y)
        raise _refuse(y, self.valid())

    def valid(self) -> str:
        return "; ".join(kind.valid() for kind in self.kinds())


def condition_for(config: JiTConfig) -> Condition:
    """The condition kind of a network built from ``config``: text prompts for a text network
    (``config.text``), class labels otherwise."""
    if config.text is None:
        return ClassLabels(config.num_classes)
    return TextPrompts(config.text.max_len, config.text.dim)
