"""Token routing: during training a random subset of the patch tokens skips a contiguous range
of blocks (the "token routing and sparsification" bucket of seeds/002).

- **TREAD** (Krause et al. 2025): the tokens that are not kept bypass blocks ``start … end``
  and rejoin *unchanged* at their original positions after block ``end``; no parameters.
- **SPRINT** (Park et al. 2025, sparse–dense residual fusion): the tokens entering block
  ``start`` are kept as a dense shallow path; the kept tokens run through the middle blocks
  (the sparse deep path); after block ``end`` the deep output is restored to full length
  with a learned ``[MASK]`` token at the dropped positions and fused with the dense path,
  ``h = W·[dense ‖ deep] + b`` (``W``: a learned ``2D → D`` linear), before the decoder
  blocks. Without a route (sampling) the deep path sees every token and the fusion still
  applies, so the network trained with routing is the one that samples.

Conventions (both kinds): routed blocks are ``start … end``, both included (PRX's
``route_start``/``route_end``); a negative index counts from the depth (``end: -4`` =
``depth − 4``). The in-context class tokens are never routed: they go through every block
they reach. Kept tokens are rotated by RoPE at their own grid positions (the RoPE tables are
gathered per sample). Sampling runs the full network (``route=None``).

The network never samples. The training objective draws the route — the kept patch indices
``[B, K]`` — from the step's seeded generator with :class:`RouteSampler` and calls
``net(z_t, t, y, route=keep)``; so exact resume and DDP equality hold with routing on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from denoiselab.config import ConfigError, from_dict

from .layers import AxialRoPE

RoutingKind = Literal["none", "tread", "sprint"]
KINDS = ("none", "tread", "sprint")


@dataclass(frozen=True)
class RoutingConfig:
    """``model.routing``: which tokens skip which blocks while training (module docstring).

    kind: ``none`` | ``tread`` | ``sprint``.
    ratio: fraction of the patch tokens that skip the routed blocks, in ``[0, 1)``
        (TREAD/PRX 0.5; SPRINT 0.75). ``round(ratio·N)`` tokens skip, at most ``N − 1``.
    start, end: first and last routed block, both included; negative counts from the depth.
        The default is PRX's range, blocks 2 … depth − 4.
    """

    kind: RoutingKind = "none"
    ratio: float = 0.5
    start: int = 2
    end: int = -4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"model.routing.kind={self.kind!r}; valid: {', '.join(KINDS)}")
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"model.routing.ratio={self.ratio!r} must lie in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def blocks(self, depth: int) -> range:
        """The routed block indices for a network of ``depth`` blocks (ConfigError if the
        range falls outside it or is empty)."""
        start = self.start + depth if self.start < 0 else self.start
        end = self.end + depth if self.end < 0 else self.end
        if not 0 <= start <= end < depth:
            raise ConfigError(
                f"model.routing: start={self.start}, end={self.end} give blocks {start} … {end}, "
                f"not a range inside the {depth} blocks (need 0 <= start <= end <= {depth - 1}; "
                "negative values count from the depth)"
            )
        return range(start, end + 1)

    def num_kept(self, num_patches: int) -> int:
        """K, the patch tokens that go through the routed blocks (at least 1)."""
        skipped = min(round(self.ratio * num_patches), num_patches - 1)
        return num_patches - skipped


def routing_config(value: RoutingConfig | Mapping[str, Any] | None) -> RoutingConfig:
    """A ``RoutingConfig`` from itself, a mapping of its fields (YAML) or None (no routing)."""
    if value is None:
        return RoutingConfig()
    if isinstance(value, RoutingConfig):
        return value
    if isinstance(value, Mapping):
        return from_dict(RoutingConfig, value, "model.routing")
    raise ConfigError(f"model.routing={value!r}: expected a mapping of its fields")


# --------------------------------------------------------------------------- the route


def draw_route(
    cfg: RoutingConfig,
    batch: int,
    num_patches: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The kept patch indices ``long [B, K]``, ascending: a uniformly random subset of
    ``K = cfg.num_kept(N)`` tokens per sample, drawn from ``generator`` (one ``rand [B, N]``)."""
    keep = cfg.num_kept(num_patches)
    scores = torch.rand(batch, num_patches, generator=generator, device=device)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


@dataclass(frozen=True)
class RouteSampler:
    """What the training objective needs to draw a network's routes: ``sampler(B, gen, dev)``."""

    cfg: RoutingConfig
    num_patches: int
    blocks: range

    @classmethod
    def for_model(cls, model_cfg: Any) -> RouteSampler | None:
        """The sampler for a ``JiTConfig`` (None when it does not route)."""
        cfg = getattr(model_cfg, "routing", None)
        if cfg is None or not cfg.enabled:
            return None
        return cls(cfg, model_cfg.num_patches, cfg.blocks(model_cfg.depth))

    def __call__(
        self, batch: int, generator: torch.Generator | None, device: torch.device | str
    ) -> Tensor:
        return draw_route(self.cfg, batch, self.num_patches, generator, device)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index [B, K]`` of ``x [B, N, ...]`` per sample -> ``[B, K, ...]``."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def scatter_tokens(base: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """A copy of ``base [B, N, D]`` with rows ``index [B, K]`` replaced by ``rows [B, K, D]``."""
    idx = index.unsqueeze(-1).expand(-1, -1, base.shape[-1])
    return base.scatter(1, idx, rows.to(base.dtype))


# --------------------------------------------------------------------------- in the network


class TokenRoPE:
    """``rope`` restricted to the tokens ``index [B, K′]`` of its sequence: the same rotation
    with its per-token tables gathered per sample ([B, 1, K′, head_dim])."""

    def __init__(self, rope: AxialRoPE, index: Tensor) -> None:
        self.rope = rope
        self.cos = rope.cos[index].unsqueeze(1)
        self.sin = rope.sin[index].unsqueeze(1)

    def __call__(self, x: Tensor) -> Tensor:
        return self.rope.rotate(x, self.cos, self.sin)


class TokenRouter(nn.Module):
    """The routing of one network: its blocks and, for SPRINT, the fusion ``Linear(2D → D)``
    and the ``[MASK]`` token (zero-initialised, learned, as PRX). ``begin(route)`` starts
    one forward pass (:class:`RoutedPass`)."""

    def __init__(self, cfg: RoutingConfig, depth: int, dim: int) -> None:
        super().__init__()
        self.kind = cfg.kind
        self.blocks = cfg.blocks(depth)
        self.fuse: nn.Linear | None = None
        self.mask_token: nn.Parameter | None = None
        if cfg.kind == "sprint":
            self.fuse = nn.Linear(2 * dim, dim)
            self.mask_token = nn.Parameter(torch.zeros(dim))

    def begin(self, route: Tensor | None) -> RoutedPass:
        if route is not None and (route.dim() != 2 or route.dtype != torch.long):
            raise ValueError(f"route must be kept patch indices long [B, K], got {route.shape}")
        return RoutedPass(self, route)


class RoutedPass:
    """The routing state of one forward pass; the network calls, for block ``i``:
    ``x = enter(i, x, prefix)``, the block with ``rope(rope, prefix, i)``,
    ``hidden(i, x, prefix)`` for ``hidden_out`` and ``x = leave(i, x, prefix)``.

    ``x`` is ``[B, prefix + tokens, D]``: ``prefix`` in-context tokens in front of the patch
    tokens (all of them outside the routed range, the kept ones inside it).
    """

    def __init__(self, router: TokenRouter | None, keep: Tensor | None) -> None:
        self.router, self.keep = router, keep
        self.first = router.blocks.start if router is not None else -1
        self.last = router.blocks.stop - 1 if router is not None else -1
        self.stash: Tensor | None = None  # patch tokens entering the routed range [B, N, D]
        self._ropes: dict[tuple[int, int], TokenRoPE] = {}

    def routed(self, i: int) -> bool:
        """Whether block ``i`` sees only the kept tokens in this pass."""
        return self.keep is not None and self.first <= i <= self.last

    def enter(self, i: int, x: Tensor, prefix: int) -> Tensor:
        if i != self.first:
            return x
        self.stash = x[:, prefix:]
        if self.keep is None:
            return x
        return torch.cat([x[:, :prefix], gather_tokens(self.stash, self.keep)], dim=1)

    def rope(self, rope: AxialRoPE | None, prefix: int, i: int) -> AxialRoPE | TokenRoPE | None:
        """``rope`` for block ``i``; in a routed block, its tables at the kept tokens' rows."""
        if rope is None or not self.routed(i):
            return rope
        key = (id(rope), prefix)
        if key not in self._ropes:  # in-context rows first (identity rotation), then the kept
            front = torch.arange(prefix, device=self.keep.device).expand(self.keep.shape[0], -1)
            self._ropes[key] = TokenRoPE(rope, torch.cat([front, self.keep + prefix], dim=1))
        return self._ropes[key]

    def hidden(self, i: int, x: Tensor, prefix: int) -> Tensor:
        """Block ``i``'s patch-token output ``[B, N, D]``; rows that skipped it hold the value
        they carry around the routed range (their state entering block ``start``)."""
        patches = x[:, prefix:]
        if not self.routed(i):
            return patches
        return scatter_tokens(self.stash, self.keep, patches)

    def leave(self, i: int, x: Tensor, prefix: int) -> Tensor:
        if i != self.last:
            return x
        router, deep = self.router, x[:, prefix:]
        if router.kind == "tread":
            if self.keep is not None:  # skipped tokens rejoin unchanged
                deep = scatter_tokens(self.stash, self.keep, deep)
        else:  # sprint: [MASK] at the dropped positions, then fuse with the dense path
            if self.keep is not None:
                mask = router.mask_token.to(deep.dtype).expand(*self.stash.shape[:2], -1)
                deep = scatter_tokens(mask, self.keep, deep)
            deep = router.fuse(torch.cat([self.stash.to(deep.dtype), deep], dim=-1))
        return torch.cat([x[:, :prefix], deep.to(x.dtype)], dim=1)


def begin_pass(router: TokenRouter | None, route: Tensor | None) -> RoutedPass:
    """The routing state of one forward pass of a network with ``router`` (None: no routing,
    and then a ``route`` is an error rather than silently ignored)."""
    if router is not None:
        return router.begin(route)
    if route is not None:
        raise ValueError("route given to a network without routing (model.routing.kind: none)")
    return RoutedPass(None, None)
