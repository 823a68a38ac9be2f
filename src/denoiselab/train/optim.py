"""Optimizers behind a config name: the loop calls :func:`build_optimizer`, never a class.

``OPTIMIZERS`` maps ``optim.name`` to a builder ``(cfg, named_params, lr, device) ->
Optimizer``. A builder may split the parameters into groups (Muon for 2-D hidden matrices,
AdamW for the rest); the parameter order it receives is the module's registration order, so
optimizer state in a checkpoint lines up with the same run rebuilt. Each group's ``lr`` at
build time is its base rate; the loop's schedule scales every group by the same factor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from denoiselab.config import ConfigError
from denoiselab.train.muon import Muon, resolve_ns_dtype

NamedParams = Sequence[tuple[str, nn.Parameter]]
Builder = Callable[..., torch.optim.Optimizer]


def has_fused_adamw(device: torch.device) -> bool:
    """Fused AdamW (one kernel per tensor instead of ~10 ops) exists on CUDA and, since
    torch 2.4, on CPU; there it makes the optimizer step of JiT-T/4 ~30× faster."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and (major, minor) >= (2, 4))


def has_muon() -> bool:
    """``torch.optim.Muon`` exists (PyTorch ≥ 2.9). denoiselab's own :class:`~.muon.Muon`
    (same update, a choice of Newton–Schulz dtype) needs nothing of it; tests compare them."""
    return hasattr(torch.optim, "Muon")


def _adamw_kwargs(cfg: Any, lr: float, device: torch.device) -> dict[str, Any]:
    return dict(
        lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=has_fused_adamw(device)
    )


def _adamw(cfg: Any, named: NamedParams, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW on every parameter (Table 9: β = (0.9, 0.95), weight decay 0)."""
    return torch.optim.AdamW([p for _, p in named], **_adamw_kwargs(cfg, lr, device))


def is_hidden_matrix(name: str, param: Tensor) -> bool:
    """Whether Muon should update ``param``: a 2-D weight inside a Transformer block that is
    not part of the adaLN conditioning MLP (``model.blocks.<i>.…`` minus ``….ada.…``).

    Everything else — patch/time/class embeddings, positions and in-context tokens, norms,
    biases, the adaLN modulation, the final layer, and the parameters of loss terms — is
    left to AdamW, the split of Jordan et al.'s Muon and of the PRX code.
    """
    return param.ndim == 2 and ".blocks." in f".{name}" and ".ada." not in name


def muon_split(named: NamedParams) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(muon, adamw)`` parameter lists, each in the given order."""
    muon = [p for n, p in named if is_hidden_matrix(n, p)]
    adamw = [p for n, p in named if not is_hidden_matrix(n, p)]
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """:class:`~.muon.Muon` on hidden matrices and ``torch.optim.AdamW`` on the rest, as one
    optimizer with one state dict (groups tagged ``algorithm: muon | adamw``).

    The two inner optimizers share this optimizer's ``state`` and group dicts, so
    ``state_dict``/``load_state_dict`` (and the checkpoint format) are the standard ones.
    """

    def __init__(
        self,
        muon_params: list[nn.Parameter],
        adamw_params: list[nn.Parameter],
        *,
        muon_kwargs: dict[str, Any],
        adamw_kwargs: dict[str, Any],
    ) -> None:
        self._inner: dict[str, torch.optim.Optimizer] = {}
        if muon_params:
            self._inner["muon"] = Muon(muon_params, **muon_kwargs)
        if adamw_params:
            self._inner["adamw"] = torch.optim.AdamW(adamw_params, **adamw_kwargs)
        groups = []
        for tag, inner in self._inner.items():
            for group in inner.param_groups:
                group["algorithm"] = tag
                groups.append(group)
        super().__init__(groups, {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (again after a
        ``load_state_dict``, which replaces the group dicts)."""
        for tag, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["algorithm"] == tag]
            inner.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner.values():
            inner.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()


def _muon(cfg: Any, named: NamedParams, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Muon (Newton–Schulz-orthogonalised momentum) on 2-D hidden matrices, AdamW on the rest;
    the iteration runs in ``optim.muon.ns_dtype`` resolved for ``device``."""
    muon, adamw = muon_split(named)
    if not muon:
        raise ConfigError("optim.name='muon' but the model has no 2-D hidden matrices for it")
    mc = cfg.muon
    muon_kwargs = dict(
        lr=lr if mc.lr is None else mc.lr,
        weight_decay=cfg.weight_decay if mc.weight_decay is None else mc.weight_decay,
        momentum=mc.momentum,
        nesterov=mc.nesterov,
        ns_steps=mc.ns_steps,
        adjust_lr_fn=mc.adjust_lr,
        ns_dtype=resolve_ns_dtype(mc.ns_dtype, device),
    )
    return MuonWithAdamW(
        muon, adamw, muon_kwargs=muon_kwargs, adamw_kwargs=_adamw_kwargs(cfg, lr, device)
    )


OPTIMIZERS: dict[str, Builder] = {"adamw": _adamw, "muon": _muon}


def build_optimizer(
    cfg: Any, module: nn.Module, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``module``'s trainable parameters."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return OPTIMIZERS[cfg.name](cfg, named, lr, device)


def lr_at(step: int, base: float, warmup_steps: float, total: int, cooldown_steps: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then constant (Table 9); with
    ``cooldown_steps`` > 0, a linear fall to 0 over the last ``cooldown_steps`` of ``total``.
    The loop calls it with ``base = 1`` for the factor that scales every group's base rate."""
    factor = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    if cooldown_steps > 0:
        factor = min(factor, max(0.0, (total - step) / cooldown_steps))
    return base * factor
