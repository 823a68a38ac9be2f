"""Sampling a text run: from prompts, or from class labels mapped to captions of the data.

:class:`PromptSampler` wraps the run's :class:`~denoiselab.sampling.generate.Sampler` (whose
unconditional condition is the empty prompt). Called with labels ``[n]`` — as the training
grids, periodic evaluation, ``denoiselab eval`` and the ablation scorer call every sampler —
it samples each label from a caption of an image of that class (:func:`~.data.class_prompts`,
chosen per batch by :func:`~.data.prompts_for`),
so the label-keyed metrics (FD, KID, the probe's accuracy) score text runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from denoiselab.sampling.generate import Sampler
from denoiselab.text import Tokenizer
from denoiselab.text.data import prompts_for


class PromptSampler:
    """``sampler(labels [n] | ids [n, L], seed, **settings)`` and :meth:`prompts`.

    ``table``: called once, on first label-keyed use: ``table()[y]`` = prompts of class y.
    """

    def __init__(
        self, sampler: Sampler, tokenizer: Tokenizer, table: Callable[[], list[list[str]]]
    ) -> None:
        self.sampler, self.tokenizer, self._table_fn = sampler, tokenizer, table
        self._table: list[list[str]] | None = None
        self.num_classes = sampler.num_classes

    def table(self) -> list[list[str]]:
        if self._table is None:
            self._table = self._table_fn()
        return self._table

    def prompts_for(self, labels: Tensor, seed: int) -> list[str]:
        """The prompt each label is sampled with from noise ``seed`` (:func:`~.data.prompts_for`)."""
        return prompts_for(labels.cpu(), self.table(), seed)

    def __call__(self, labels: Tensor, seed: int, **settings: Any) -> Tensor:
        ids = labels if labels.dim() == 2 else self.tokenizer(self.prompts_for(labels, seed))
        return self.sampler(ids, seed, **settings)

    @torch.no_grad()
    def prompts(
        self,
        prompts: Sequence[str],
        seed: int,
        *,
        negative_prompt: str | None = None,
        **settings: Any,
    ) -> Tensor:
        """Decoded samples ``float [n, C, H, W]`` in ``[-1, 1]`` for ``prompts`` (n of them);
        CFG's unconditional branch is ``negative_prompt`` (default: the empty prompt)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        ids = self.tokenizer(list(prompts))
        negative = None
        if negative_prompt:
            negative = self.tokenizer([negative_prompt]).expand(len(prompts), -1).contiguous()
        return self.sampler(ids, seed, negative=negative, **settings)


def write_prompts(path: Any, prompts: Sequence[str]) -> None:
    """``prompts``, one a line, numbered in grid order (row-major), beside a grid image."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(prompts)))
