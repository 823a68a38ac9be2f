"""Optimizers behind a config name: the loop calls :func:`build_optimizer`, never a class.

``OPTIMIZERS`` maps ``optim.name`` to a builder ``(cfg, named_params, lr, device) ->
Optimizer``. A builder may split the parameters into groups (e.g. Muon for 2-D hidden
matrices, AdamW for the rest); the parameter order it receives is the module's registration
order, so optimizer state in a checkpoint lines up with the same run rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from denoiselab.config import ConfigError

NamedParams = Sequence[tuple[str, nn.Parameter]]
Builder = Callable[..., torch.optim.Optimizer]


def has_fused_adamw(device: torch.device) -> bool:
    """Fused AdamW (one kernel per tensor instead of ~10 ops) exists on CUDA and, since
    torch 2.4, on CPU; there it makes the optimizer step of JiT-T/4 ~30× faster."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and (major, minor) >= (2, 4))


def _adamw(cfg, named: NamedParams, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW on every parameter (Table 9: β = (0.9, 0.95), weight decay 0)."""
    return torch.optim.AdamW(
        [p for _, p in named],
        lr=lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=has_fused_adamw(device),
    )


OPTIMIZERS: dict[str, Builder] = {"adamw": _adamw}


def build_optimizer(
    cfg, module: nn.Module, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``module``'s trainable parameters."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return OPTIMIZERS[cfg.name](cfg, named, lr, device)


def lr_at(step: int, base: float, warmup_steps: float, total: int, cooldown_steps: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then constant (Table 9); with
    ``cooldown_steps`` > 0, a linear fall to 0 over the last ``cooldown_steps`` of ``total``."""
    factor = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    if cooldown_steps > 0:
        factor = min(factor, max(0.0, (total - step) / cooldown_steps))
    return base * factor
