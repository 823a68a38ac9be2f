"""Muon (Jordan et al. 2024) with a choice of dtype for its Newton–Schulz iteration.

The update is ``torch.optim.Muon``'s (PyTorch 2.9+), step for step, for each 2-D parameter θ
with gradient g, momentum μ, rate γ and weight decay λ:

    B ← μ·B + (1 − μ)·g                      (EMA-form momentum buffer, starts at 0)
    U ← (1 − μ)·g + μ·B  if nesterov else B   (Nesterov look-ahead)
    O ← NS₅(U)                                 (quintic Newton–Schulz, a = 3.4445,
                                                b = −4.7750, c = 2.0315, from X = U/‖U‖_F)
    θ ← θ·(1 − γλ) − γ′·O                      (decoupled weight decay; γ′ = adjusted rate:
                                                "original" γ·√max(1, A/B),
                                                "match_rms_adamw" 0.2·γ·√max(A, B))

The only difference is where NS₅ runs. PyTorch always casts to bf16, which is fast where the
hardware multiplies bf16 natively (CUDA, AVX512-BF16 or AMX CPUs) and ~35× slower than fp32
where it is emulated (an AVX2 CPU: docs/claims.md). ``ns_dtype`` picks it; ``auto`` is bf16
only where it is native (:func:`native_bf16`). State dicts are those of ``torch.optim.Muon``
(one ``momentum_buffer`` per parameter, the same group keys), so checkpoints carry over.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

NsDtype = Literal["auto", "bf16", "fp32"]
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of Linux's ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device | str, flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 matrix products run natively on ``device``: CUDA with bf16 support, or a
    CPU with AVX512-BF16, AMX-BF16 (x86) or BF16 (ARM) that oneDNN is allowed to use
    (``ONEDNN_MAX_CPU_ISA`` below those ISAs turns it off). Unknown: False (fp32 is safe)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = _cpu_flags() if flags is None else flags
    if not flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa in ("ALL", "DEFAULT") or any(k in isa for k in ("BF16", "AMX", "AVX10"))


def resolve_ns_dtype(name: NsDtype, device: torch.device | str) -> torch.dtype:
    """``bf16`` / ``fp32`` as given; ``auto``: bf16 where :func:`native_bf16`, else fp32."""
    if name == "bf16" or (name == "auto" and native_bf16(device)):
        return torch.bfloat16
    if name in ("fp32", "auto"):
        return torch.float32
    raise ValueError(f"ns_dtype={name!r}; valid: auto, bf16, fp32")


def newton_schulz(
    update: Tensor,
    dtype: torch.dtype,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = EPS,
) -> Tensor:
    """NS₅ of a 2-D ``update`` [A, B] in ``dtype``: ``X ← aX + (bG + cG²)X``, ``G = XXᵀ``, on
    the wide orientation, from ``X = U/max(‖U‖_F, eps)``. Returns [A, B] in ``dtype``."""
    a, b, c = coefficients
    x = update.to(dtype, copy=True)  # a copy even in fp32: the update may be the momentum buffer
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The rate applied to the orthogonalised update of an [A, B] matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}; valid: original, match_rms_adamw")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters with its Newton–Schulz iteration in ``ns_dtype`` (a torch dtype,
    see :func:`resolve_ns_dtype`); arguments and defaults as ``torch.optim.Muon``."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if not (lr >= 0 and momentum >= 0 and weight_decay >= 0):
            raise ValueError(f"Muon: need lr, momentum, weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")  # fmt: skip
        adjusted_lr(1.0, adjust_lr_fn, torch.Size([1, 1]))  # names a bad adjust_lr_fn now
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn)  # fmt: skip
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # not a group entry: loading a state dict must not change it
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon updates 2-D parameters only, got shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                ortho = newton_schulz(update, self.ns_dtype, group["ns_steps"],
                                      group["ns_coefficients"], group["eps"])  # fmt: skip
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
