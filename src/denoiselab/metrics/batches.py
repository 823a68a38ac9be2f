"""Sample-and-score in seeded batches, shared out over the ranks of a process group.

Every metric that scores generated images walks the same loop: batch ``i`` of ``count``
items (class labels or prompts) is generated with seed :func:`batch_seed` ``(seed, i)`` as
``uint8 [n, 3, H, W]`` and handed to a scorer (feature extractors, CLIP, the attribute
probe). :func:`run_batches` is that loop. Under an initialised process group rank ``r``
takes the batches ``i ≡ r (mod world)`` and the per-batch results are gathered in batch
order on every rank: batch ``i`` has the items and seed it has in one process, so the
result does not depend on the number of ranks (only the wall time does).

:func:`rank_zero_first` orders work that fills a shared cache (a probe trained on first
use, reference statistics): rank 0 does it, the others then read the cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch.distributed as dist
from torch import Tensor

from .images import check_uint8_images

T = TypeVar("T")

__all__ = ["BatchRun", "batch_seed", "rank_world", "rank_zero_first", "run_batches"]


def batch_seed(seed: int, index: int) -> int:
    """Seed of generation batch ``index``: ``SeedSequence([seed, index])`` → one uint32."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size of an initialised process group (else 0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the body on rank 0, then on the other ranks (one process: just run it). For work
    whose first run writes a cache the later runs read (a probe, reference statistics)."""
    rank, world = rank_world()
    if rank > 0:
        dist.barrier()  # wait for rank 0 to fill the cache
    yield
    if rank == 0 and world > 1:
        dist.barrier()


@dataclass
class BatchRun(Generic[T]):
    """What :func:`run_batches` returns, the same on every rank."""

    results: list[T]  # one per batch, in batch order
    seeds: list[int]  # batch_seed(seed, i)
    seconds: float  # time in ``generate`` (the slowest rank's under a process group)
    image_shape: list[int]  # [C, H, W] of the generated images
    world: int  # ranks that shared the batches


def run_batches(
    generate: Callable[[int, int, int], Tensor],
    score: Callable[[Tensor, int, int], T],
    count: int,
    batch: int,
    seed: int,
    what: str = "items",
) -> BatchRun[T]:
    """For each batch ``[start, stop)`` of ``count`` items: ``images = generate(start, stop,
    seed_i)`` (``uint8 [stop − start, 3, H, W]``, checked), then ``score(images, start,
    stop)``. Only ``generate`` is timed (it ends with ``.cpu()``, which waits for the
    device). Results must be picklable to be gathered over ranks (tensors on the CPU).
    ``what`` names the items in errors ("labels", "prompts")."""
    if count < 1 or batch < 1:
        raise ValueError(
            f"need at least one of the {what} (got {count}) and batch >= 1 (got {batch})"
        )
    rank, world = rank_world()
    starts = list(range(0, count, batch))
    seeds = [batch_seed(seed, index) for index in range(len(starts))]
    local: dict[int, T] = {}
    seconds, shape = 0.0, []
    for index in range(rank, len(starts), world):
        start, stop = starts[index], min(starts[index] + batch, count)
        tic = time.perf_counter()
        images = generate(start, stop, seeds[index]).cpu()
        seconds += time.perf_counter() - tic
        images = check_uint8_images(images)
        if images.shape[0] != stop - start:
            raise ValueError(
                f"generate returned {images.shape[0]} images for {stop - start} {what}"
            )
        shape = list(images.shape[1:])
        local[index] = score(images, start, stop)
    if world > 1:
        parts: list[tuple[dict[int, T], float, list[int]] | None] = [None] * world
        dist.all_gather_object(parts, (local, seconds, shape))
        gathered = [p for p in parts if p is not None]
        local = {i: item for part, _, _ in gathered for i, item in part.items()}
        seconds = max(part[1] for part in gathered)
        shape = next((part[2] for part in gathered if part[2]), shape)
    return BatchRun([local[i] for i in sorted(local)], seeds, seconds, shape, world)
