"""JiT: "Just image Transformers" — a plain ViT on patches with adaLN-Zero (seeds/003 §4.1).

The network only maps ``(z_t, t, y)`` to a raw output of the same shape as ``z_t``; it knows
nothing of prediction space, loss, CFG or EMA (docs/architecture.md, "Network contract").
Time convention: ``t = 1`` is data, ``t = 0`` is noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from denoiselab.text.config import TextConfig

from .layers import (
    AdaLNModulation,
    Attention,
    AxialRoPE,
    ClassEmbedder,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
)
from .routing import RoutingConfig, TokenRouter, begin_pass, routing_config


@dataclass(frozen=True)
class JiTConfig:
    """Architecture of a JiT network (Table 9). Validated at construction.

    image_size: side of the square input (pixels, or latent cells for JLT).
    patch_size: side p of a patch; the sequence has ``(image_size / p)²`` patch tokens.
    bottleneck: width d′ of the low-rank patch embedding (Fig. 4); None = plain ``p·p·C → D``.
    dropout: applied in attention and MLP of the middle half of the blocks (Appendix A).
    in_context_len: number of in-context class tokens (0 disables them), inserted before
        block ``in_context_start`` and removed before the final layer (Appendix A).
    use_rope / use_qknorm: the "Just Advanced" switches of Table 4.
    routing: token routing while training (TREAD, SPRINT; ``models.routing``); a mapping of
        its fields is accepted.
    text: text conditioning (:class:`~denoiselab.text.config.TextConfig`; a mapping is
        converted); None = class-conditional. A text network takes token ids as its
        condition, uses no class labels and no in-context class tokens.
    """

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    bottleneck: int | None = None
    dropout: float = 0.0
    num_classes: int = 10
    in_context_len: int = 0
    in_context_start: int = 0
    use_rope: bool = True
    use_qknorm: bool = True
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    text: TextConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "routing", routing_config(self.routing))
        if isinstance(self.text, Mapping):
            from denoiselab.config import from_dict

            object.__setattr__(self, "text", from_dict(TextConfig, self.text, "model.text"))
        _require(
            self.text is None or self.in_context_len == 0,
            f"in_context_len={self.in_context_len} must be 0 with text conditioning "
            "(in-context tokens repeat a class embedding; text tokens replace them)",
        )
        _require(
            self.text is None or not self.routing.enabled,
            "model.routing with text conditioning is not supported yet (the routed pass does "
            "not carry the text tokens); use model.routing.kind: none for text runs",
        )
        for name in ("image_size", "patch_size", "in_channels", "hidden_size", "depth"):
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)!r} must be >= 1")
        _require(self.num_heads >= 1, f"num_heads={self.num_heads!r} must be >= 1")
        _require(
            self.image_size % self.patch_size == 0,
            f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
            f"valid patch sizes divide {self.image_size}",
        )
        _require(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        _require(
            self.hidden_size % 4 == 0,
            f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)",
        )
        _require(
            not self.use_rope or self.head_dim % 4 == 0,
            f"head_dim={self.head_dim} (hidden_size/num_heads) must be divisible by 4 for "
            "axial 2-D RoPE; change num_heads or set use_rope=False",
        )
        _require(self.mlp_ratio > 0, f"mlp_ratio={self.mlp_ratio!r} must be > 0")
        _require(
            self.bottleneck is None or self.bottleneck >= 1,
            f"bottleneck={self.bottleneck!r} must be None or >= 1",
        )
        _require(0.0 <= self.dropout < 1.0, f"dropout={self.dropout!r} must be in [0, 1)")
        _require(self.num_classes >= 1, f"num_classes={self.num_classes!r} must be >= 1")
        _require(self.in_context_len >= 0, f"in_context_len={self.in_context_len!r} must be >= 0")
        _require(
            0 <= self.in_context_start <= self.depth,
            f"in_context_start={self.in_context_start} must be in [0, depth={self.depth}]",
        )
        if self.routing.enabled:
            self.routing.blocks(self.depth)  # a range outside the depth is a ConfigError

    @property
    def grid_size(self) -> int:
        """Patches per side, ``image_size / patch_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens N (in-context tokens excluded)."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Dimension of one raw patch, ``p·p·C``."""
        return self.patch_size**2 * self.in_channels

    def block_dropout(self, index: int) -> float:
        """Dropout of block ``index``: ``dropout`` on the middle half, else 0 (Appendix A)."""
        lo, hi = self.depth // 4, self.depth // 4 * 3
        return self.dropout if lo <= index < hi else 0.0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"JiTConfig: {message}")


class JiTBlock(nn.Module):
    """Pre-norm Transformer block with adaLN-Zero (DiT) conditioning.

    x: [B, N, D], c: [B, D] -> [B, N, D].
    """

    def __init__(self, cfg: JiTConfig, dropout: float) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = RMSNorm(d)
        self.attn = Attention(d, cfg.num_heads, qk_norm=cfg.use_qknorm, dropout=dropout)
        self.norm2 = RMSNorm(d)
        self.mlp = SwiGLU(d, cfg.mlp_ratio, dropout=dropout)
        self.ada = AdaLNModulation(d, 6)

    def forward(self, x: Tensor, c: Tensor, rope: AxialRoPE | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        # gated residuals x + gate·f(x), each one fused multiply-add pass
        x = torch.addcmul(
            x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        )
        x = torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated RMSNorm and a linear predictor to ``p·p·C`` per token (zero-init).

    x: [B, N, D], c: [B, D] -> [B, N, p·p·C].
    """

    def __init__(self, dim: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.ada = AdaLNModulation(dim, 2)
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c)
        return self.linear(modulate(self.norm(x), shift, scale))


class JiT(nn.Module):
    """Just image Transformer (Fig. 3) with the "Just Advanced" options of §4.4.

    ``cond_embedder`` maps the condition batch ``y`` to [B, D]; default :class:`ClassEmbedder`.
    """

    block_type: type[nn.Module] = JiTBlock  # the text network's blocks add text attention

    def __init__(self, config: JiTConfig, cond_embedder: nn.Module | None = None) -> None:
        super().__init__()
        cfg = self.config = config
        d = cfg.hidden_size
        self.t_embedder = TimestepEmbedder(d)
        if cond_embedder is None:
            cond_embedder = ClassEmbedder(cfg.num_classes, d)
        self.cond_embedder = cond_embedder
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, d, cfg.bottleneck)
        pos = sincos_pos_embed_2d(d, cfg.grid_size).unsqueeze(0)  # [1, N, D], fixed
        self.register_buffer("pos_embed", pos, persistent=False)
        self.in_context_pos: nn.Parameter | None = None
        if cfg.in_context_len > 0:
            self.in_context_pos = nn.Parameter(torch.zeros(1, cfg.in_context_len, d))
        self.rope: AxialRoPE | None = None
        self.rope_in_context: AxialRoPE | None = None
        if cfg.use_rope:
            self.rope = AxialRoPE(cfg.head_dim, cfg.grid_size)
            if cfg.in_context_len > 0:
                self.rope_in_context = AxialRoPE(cfg.head_dim, cfg.grid_size, cfg.in_context_len)
        self.blocks = nn.ModuleList(
            self.block_type(cfg, cfg.block_dropout(i)) for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(d, cfg.patch_dim)
        self.router: TokenRouter | None = None
        if cfg.routing.enabled:
            self.router = TokenRouter(cfg.routing, cfg.depth, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official JiT init: xavier linears, N(0, 0.02) embeddings, zero adaLN and output."""
        own_cond = isinstance(self.cond_embedder, ClassEmbedder)
        # A caller-provided condition encoder (e.g. text) keeps its own initialisation.
        skip = set() if own_cond else set(self.cond_embedder.modules())
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in skip:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.patch_embed.reset_parameters()
        self.t_embedder.reset_parameters()
        if own_cond:
            self.cond_embedder.reset_parameters()
        if self.in_context_pos is not None:
            nn.init.normal_(self.in_context_pos, std=0.02)
        for block in self.blocks:
            block.ada.reset_parameters()  # adaLN-Zero: every gate starts at 0
        self.final_layer.ada.reset_parameters()
        nn.init.zeros_(self.final_layer.linear.weight)  # ⇒ the initial output is exactly 0
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self,
        z_t: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        hidden_out: dict[int, Tensor] | None = None,
        route: Tensor | None = None,
    ) -> Tensor:
        """z_t [B, C, H, W], t [B] (t = 1 is data), y [B] long (``num_classes`` = null class).

        If ``hidden_out`` is given, each key (a block index) is set to the patch-token hidden
        state [B, N, D] after that block, in-context tokens removed. ``route``: the kept patch
        indices long [B, K] of a routed training pass (``models.routing``); then a routed
        block's ``hidden_out`` rows of the skipped tokens hold the value they carry around the
        routed range. Returns [B, C, H, W].
        """
        cfg = self.config
        _check_input(cfg, z_t)
        y_emb = self.cond_embedder(y)  # [B, D]
        c = self.t_embedder(t) + y_emb  # adaLN-Zero condition (§4.1)
        x = self.patch_embed(z_t) + self.pos_embed.to(z_t.dtype)  # [B, N, D]
        prefix = 0  # number of in-context tokens currently in front of the patches
        routing = begin_pass(self.router, route)
        for i, block in enumerate(self.blocks):
            if self.in_context_pos is not None and i == cfg.in_context_start:
                x = torch.cat([self._in_context_tokens(y_emb), x], dim=1)
                prefix = cfg.in_context_len
            x = routing.enter(i, x, prefix)
            x = block(x, c, routing.rope(self.rope_in_context if prefix else self.rope, prefix, i))
            if hidden_out is not None and i in hidden_out:
                hidden_out[i] = routing.hidden(i, x, prefix)
            x = routing.leave(i, x, prefix)
        out = self.final_layer(x[:, prefix:], c)  # in-context tokens dropped
        return self.unpatchify(out)

    def _in_context_tokens(self, y_emb: Tensor) -> Tensor:
        """The class embedding repeated ``in_context_len`` times plus learned positions
        (Appendix A, following MAR). y_emb [B, D] -> [B, L, D]."""
        assert self.in_context_pos is not None
        return y_emb.unsqueeze(1) + self.in_context_pos

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p·p·C] -> [B, C, H, W], inverse of row-major patch order."""
        cfg = self.config
        g, p, ch = cfg.grid_size, cfg.patch_size, cfg.in_channels
        x = x.reshape(x.shape[0], g, g, p, p, ch)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], ch, g * p, g * p)


def _check_input(cfg: JiTConfig, z_t: Tensor) -> None:
    expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if z_t.dim() != 4 or tuple(z_t.shape[1:]) != expected:
        raise ValueError(
            f"JiT expects z_t of shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
            f"got {list(z_t.shape)}"
        )
