"""Deterministic, resumable batching: the batch of training step ``s`` is a pure function of
``(seed, s)``.

Training walks through an endless sequence of per-epoch permutations of ``range(n)``, each
seeded by ``(seed, epoch)``. Step ``s`` takes the positions ``[s·G, (s + 1)·G)`` of that
sequence (``G`` = global batch), so a batch may straddle an epoch boundary, and the epoch of
each sample is ``position // n``. Shard ``k`` of ``W`` (``k = rank · grad_accum + micro_step``)
takes the contiguous slice ``[k·b, (k + 1)·b)`` with ``b = G / W``; resuming at step ``s``
therefore yields exactly what an uninterrupted run yields there, on any number of ranks.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from denoiselab.data.base import ImageDataset

_ORDER_STREAM = 0xBA7C4  # stream tag: keeps the order draws apart from other (seed, …) users


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation of ``range(n)`` (read-only)."""
    perm = np.random.default_rng((_ORDER_STREAM, seed, epoch)).permutation(n)
    perm.flags.writeable = False
    return perm


def step_batch(seed: int, step: int, global_batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, epochs)``, both ``int64 [global_batch]``, of training step ``step``."""
    if step < 0 or global_batch < 1 or n < 1:
        raise ValueError(f"need step ≥ 0, global_batch ≥ 1, n ≥ 1; got {step}, {global_batch}, {n}")
    positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(epochs).tolist():
        in_epoch = epochs == epoch
        indices[in_epoch] = epoch_permutation(seed, epoch, n)[offsets[in_epoch]]
    return indices, epochs


def global_batch_indices(seed: int, step: int, global_batch: int, n: int) -> np.ndarray:
    """Dataset indices ``int64 [global_batch]`` of training step ``step`` (pure function)."""
    return step_batch(seed, step, global_batch, n)[0]


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for each step from ``start_step``, this shard's ``[(index, epoch), …]``."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        global_batch: int,
        shard_index: int = 0,
        num_shards: int = 1,
        start_step: int = 0,
        end_step: int | None = None,
    ) -> None:
        _check_sharding(global_batch, shard_index, num_shards, start_step, end_step)
        self.n, self.seed, self.global_batch = n, seed, global_batch
        self.batch = global_batch // num_shards
        self.start = shard_index * self.batch
        self.start_step, self.end_step = start_step, end_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        steps = (
            itertools.count(self.start_step)
            if self.end_step is None
            else range(self.start_step, self.end_step)
        )
        for step in steps:
            indices, epochs = step_batch(self.seed, step, self.global_batch, self.n)
            window = slice(self.start, self.start + self.batch)
            yield list(zip(indices[window].tolist(), epochs[window].tolist()))

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless StepBatchSampler (end_step=None) has no length")
        return self.end_step - self.start_step


def _check_sharding(
    global_batch: int, shard_index: int, num_shards: int, start_step: int, end_step: int | None
) -> None:
    if global_batch < 1 or num_shards < 1:
        raise ValueError(f"global_batch={global_batch} and num_shards={num_shards} must be ≥ 1")
    if global_batch % num_shards:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by num_shards={num_shards} "
            "(ranks × grad_accum); choose a global batch that is a multiple of it"
        )
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index}; valid: 0 … {num_shards - 1}")
    if start_step < 0 or (end_step is not None and end_step < start_step):
        raise ValueError(f"need 0 ≤ start_step ≤ end_step; got {start_step}, {end_step}")


class _EpochView(Dataset):
    """Indexes a dataset by ``(index, epoch)`` so epoch-dependent flips stay deterministic."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        index, epoch = key
        if isinstance(self.dataset, ImageDataset):
            return self.dataset.get_item(index, epoch)
        return self.dataset[index]  # a foreign dataset: no epoch-dependent augmentation


def _init_worker(worker_id: int) -> None:
    """One thread per worker; seed the global RNGs from the loader's seeded generator."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # = loader base seed + worker_id
    np.random.seed(seed)
    random.seed(seed)


class StepLoader:
    """Iterates ``(step, images [b, C, H, W], labels int64 [b])`` from ``start_step`` on
    (:meth:`iter_with_extras` also yields the batch's extras, ``{name: [b, ...]}``).

    ``b = global_batch // num_shards``; this shard gets the slice
    ``[shard_index·b, (shard_index + 1)·b)`` of the step's global batch. ``end_step=None``
    iterates forever. Workers (``num_workers > 0``) are persistent, seeded from ``seed``, and
    each prepares ``prefetch_factor`` batches ahead; ``pin_memory`` (for CUDA) lets the
    training step copy batches to the GPU without blocking.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        global_batch: int,
        shard_index: int = 0,
        num_shards: int = 1,
        start_step: int = 0,
        num_workers: int = 0,
        end_step: int | None = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ) -> None:
        if len(dataset) < 1:
            raise ValueError("StepLoader needs a non-empty dataset")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be ≥ 0")
        self.sampler = StepBatchSampler(
            len(dataset),
            seed=seed,
            global_batch=global_batch,
            shard_index=shard_index,
            num_shards=num_shards,
            start_step=start_step,
            end_step=end_step,
        )
        self.start_step, self.batch_per_shard = start_step, self.sampler.batch
        self._loader = DataLoader(
            _EpochView(dataset),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            worker_init_fn=_init_worker if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        for step, images, labels, _ in self.iter_with_extras():
            yield step, images, labels

    def iter_with_extras(self) -> Iterator[tuple[int, Tensor, Tensor, dict[str, Tensor]]]:
        """``(step, images, labels, extras)``; ``extras`` is empty unless the dataset was
        asked for side data (:meth:`~denoiselab.data.base.ImageDataset.request_extras`)."""
        for step, batch in zip(itertools.count(self.start_step), self._loader):
            images, labels, *rest = batch
            yield step, images, labels, (rest[0] if rest else {})

    def __len__(self) -> int:
        return len(self.sampler)
