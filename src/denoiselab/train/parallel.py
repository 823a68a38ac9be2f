"""How the trained module is spread over the ranks: ``strategy: ddp | fsdp``.

A strategy wraps the :class:`~denoiselab.train.module.TrainingModule` (network + loss terms)
into the module the training step calls, says how gradient accumulation skips the
gradient exchange, and converts between full tensors (what the safetensors checkpoints,
sampling and evaluation hold) and the run's own placement.

- ``ddp``: every rank holds everything; DDP averages the gradients (one process: no wrapper).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each JiT block, then on the
  training module as the root, so the remaining network parameters (embeddings, final layer)
  and the loss terms' parameters (e.g. a REPA projector) form the root's group. Every trained
  parameter is then a DTensor sharded on dim 0 over the same mesh: gradient clipping, the
  optimizer and checkpoints treat them alike, and the projector's gradients are averaged like
  the network's (it is small: sharding it costs one more slice in the root's all-gather).
  Under bf16 the parameters are gathered and used in bf16 while the fp32 shards stay the
  master weights and gradients are reduced in fp32 (``MixedPrecisionPolicy``); autocast
  still decides the compute dtype of each op, as under DDP, and forward inputs are not cast
  (the residual stream stays as under DDP). On one process FSDP runs on a one-rank group:
  nothing is sharded, the code path (mixed precision, sharded checkpoints) is the same.

``activation_checkpointing`` (either strategy) recomputes each block in the backward pass
(``torch.utils.checkpoint``, non-reentrant; the RNG state is restored, so dropout draws the
same masks and the result equals the run without it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from denoiselab.train.distributed import DistInfo


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether the run computes in bf16 (``precision: auto`` means bf16 on CUDA)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def full(t: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (an all-gather: every rank must call it), else
    ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every block of ``model.blocks`` in the backward pass. The module tree and
    parameter names are unchanged (the instance's ``forward`` is replaced)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


class Strategy:
    """``ddp``: the trained module replicated; DDP averages gradients under torchrun."""

    name = "ddp"
    sharded = False  # checkpoints are sharded folders, state must be gathered to be whole

    def __init__(self, cfg: Any, dist: DistInfo, device: torch.device) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        self.note: str | None = None  # one line for the run's log

    def wrap(self, module: nn.Module) -> nn.Module:
        """Prepare ``module`` (a TrainingModule; activation checkpointing, compile) and return
        what the training step calls. Parameters may be replaced: build the optimizer and
        EMAs from ``module`` after this."""
        model = module.model
        if self.cfg.activation_checkpointing:
            checkpoint_blocks(model)
        if self.cfg.compile:
            module.__dict__["net"] = torch.compile(model, mode=self._compile_mode())
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=ids, find_unused_parameters=module.objective.may_skip
        )

    def _compile_mode(self) -> str | None:
        return None if self.cfg.compile_mode == "default" else self.cfg.compile_mode

    def accumulating(self, step_module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's backward: gradients are exchanged on the last one."""
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        return step_module.no_sync()

    def gather(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Whole tensors (under FSDP a collective: every rank must call it)."""
        return tensors

    def shard_like(self, value: Tensor, like: Tensor | None) -> Tensor:
        """``value`` (a whole tensor) in the placement of ``like`` (this rank's slice as a
        DTensor when ``like`` is one; no communication)."""
        return value

    def close(self) -> None:
        """Release what the strategy set up for itself (FSDP's one-rank process group)."""


class FSDP(Strategy):
    """``fsdp``: FSDP2 per JiT block, then the training module as the root (module doc)."""

    name = "fsdp"
    sharded = True

    def __init__(self, cfg: Any, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        import torch.distributed as tdist

        self._own_group = False
        if not tdist.is_initialized():  # one process: a one-rank group, same code path
            backend = "nccl" if device.type == "cuda" else "gloo"
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        if dist.world_size == 1:
            self.note = (
                "note: strategy fsdp on one process: nothing is sharded (one rank holds all); "
                "mixed precision, activation checkpointing and sharded checkpoints work as on many"
            )
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device.type, (dist.world_size,))

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = module.model
        if self.cfg.activation_checkpointing:
            checkpoint_blocks(model)
        if uses_bf16(self.device, self.cfg.precision):
            mp = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        else:
            mp = MixedPrecisionPolicy(cast_forward_inputs=False)
        for block in model.blocks:
            if self.cfg.compile:  # per block, in place: names unchanged, FSDP hooks stay eager
                block.compile(mode=self._compile_mode())
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        # the root's parameters are needed again at once by the backward: keep them gathered
        fully_shard(module, mesh=self.mesh, mp_policy=mp, reshard_after_forward=False)
        return module

    def accumulating(self, step_module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return _gradient_sync(step_module, last)

    def gather(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: full(v) for k, v in tensors.items()}

    def shard_like(self, value: Tensor, like: Tensor | None) -> Tensor:
        if like is None or not is_dtensor(like) or is_dtensor(value) or value.shape != like.shape:
            return value
        from torch.distributed.tensor import distribute_tensor

        value = value.to(like.device)
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)

    def close(self) -> None:
        import torch.distributed as tdist

        if self._own_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self._own_group = False


@contextlib.contextmanager
def _gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP: reduce-scatter gradients after this backward only if ``sync`` (else they
    accumulate unsharded until the last micro-batch)."""
    module.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


STRATEGIES: dict[str, type[Strategy]] = {"ddp": Strategy, "fsdp": FSDP}


def build_strategy(cfg: Any, dist: DistInfo, device: torch.device) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg, dist, device)
