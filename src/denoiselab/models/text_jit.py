"""Text-conditioned JiT: prompt tokens as keys/values of attention (docs/architecture.md,
"Text-to-image").

The condition ``y`` is token ids ``int64 [B, L]`` (``PAD`` = -1; all ``PAD`` = the empty
prompt). :class:`TextConditioner` turns them into context tokens ``[B, 1 + L, D]``: the
encoder's tokens ``[B, L, D_text]`` → RMSNorm → ``Linear(D_text, D)``, behind one learned
*null* token that is always attended (so the empty prompt still has one key, and cross-attention
never meets a fully masked row). Two ways in (``model.text.mode``):

* ``joint`` (PRX's single stream): ``[context; image]`` tokens run through every block together;
  attention masks padded context keys; RoPE rotates image tokens only (context tokens get the
  identity rotation, like JiT's in-context tokens); context tokens are dropped before the
  final layer. Text tokens are updated by the blocks' attention and MLP.
* ``cross``: image tokens only in self-attention; after it each block adds
  ``CrossAttn(RMSNorm(x), context)`` (zero-initialised output, so a block starts as identity
  as with adaLN-Zero); the context tokens stay fixed.

Time keeps adaLN (``c = t_emb``; text does not enter adaLN). The network only maps
``(z_t, t, ids)`` to a raw output; a frozen transformers encoder is held outside the module
tree (not in ``state_dict``, not trained), loaded by :func:`attach_encoder`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from denoiselab.text.config import TextConfig

from .fused import attention
from .jit import JiT, JiTBlock, JiTConfig, _check_input
from .layers import AxialRoPE, RMSNorm, modulate


class TextConditioner(nn.Module):
    """ids ``[B, L]`` → context ``[B, 1 + L, D]`` and key mask ``bool [B, 1 + L]``.

    ``words``: a learned table ``[V, D_text]`` plus learned positions ``[L, D_text]`` (trained
    with the network). Other encoders: the frozen encoder of :func:`attach_encoder`.
    """

    def __init__(self, text: TextConfig, hidden: int) -> None:
        super().__init__()
        if not text.resolved:
            raise ValueError(
                f"model.text is not resolved (dim={text.dim}, max_len={text.max_len}, "
                f"{len(text.vocab)} vocabulary words): resolve it from the data first "
                "(denoiselab.train.text_run.resolve_text)"
            )
        self.cfg = text
        self.words: nn.Embedding | None = None
        self.pos: nn.Parameter | None = None
        if text.encoder == "words":
            self.words = nn.Embedding(len(text.vocab), text.dim)
            self.pos = nn.Parameter(torch.zeros(text.max_len, text.dim))
        self.__dict__["frozen"] = None  # a frozen encoder, outside the module tree
        self.norm = RMSNorm(text.dim)
        self.proj = nn.Linear(text.dim, hidden)
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))

    def reset_parameters(self) -> None:
        if self.words is not None:
            nn.init.normal_(self.words.weight, std=0.02)
            nn.init.normal_(self.pos, std=0.02)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.null, std=0.02)

    def encode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The text encoder alone: ids ``[B, L]`` → ``(tokens [B, L, D_text], mask [B, L])``.

        A floating ``ids [B, L, D_text + 1]`` is the encoder's output already computed (a
        ``model.text.cache``): tokens, then the mask as the last channel (all zero = the empty
        prompt, as the encoder gives for all-padding ids)."""
        cfg = self.cfg
        if ids.is_floating_point():
            if ids.dim() != 3 or ids.shape[1:] != (cfg.max_len, cfg.dim + 1):
                raise ValueError(
                    f"cached text embeddings must be [B, {cfg.max_len}, {cfg.dim + 1}] (tokens "
                    f"+ mask channel), got {list(ids.shape)}"
                )
            return ids[..., :-1], ids[..., -1] > 0.5
        if ids.dim() != 2 or ids.shape[1] != cfg.max_len or ids.dtype != torch.long:
            raise ValueError(
                f"a text network takes token ids int64 [B, {cfg.max_len}] as its condition "
                f"(model.text.max_len={cfg.max_len}), got {ids.dtype} {list(ids.shape)}"
            )
        mask = ids >= 0
        if self.words is not None:
            tokens = self.words(ids.clamp(min=0)) + self.pos
        else:
            frozen = self.__dict__["frozen"]
            if frozen is None:
                raise RuntimeError(
                    f"the frozen text encoder (model.text.encoder={cfg.encoder!r}, path "
                    f"{cfg.path!r}) is not loaded: build the network with "
                    "denoiselab.models.build_network"
                )
            tokens = frozen.to(ids.device)(ids)
        return tokens, mask

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        tokens, mask = self.encode(ids)
        ctx = self.proj(self.norm(tokens))
        b = ids.shape[0]
        ctx = torch.cat([self.null.to(ctx.dtype).expand(b, -1, -1), ctx], dim=1)
        return ctx, torch.cat([mask.new_ones(b, 1), mask], dim=1)


class CrossAttention(nn.Module):
    """Image queries over context keys/values, qk-norm, no RoPE.

    x [B, N, D], ctx [B, T, D], mask bool [B, 1, 1, T] -> [B, N, D].
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        head = dim // num_heads
        self.q_norm: nn.Module = RMSNorm(head) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(head) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = attention(self.q_norm(q), self.k_norm(k), v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TextJiTBlock(JiTBlock):
    """A JiT block with a key mask (joint) or a cross-attention sublayer (cross).

    x: [B, S, D], c: [B, D] -> [B, S, D].
    """

    def __init__(self, cfg: JiTConfig, dropout: float) -> None:
        super().__init__(cfg, dropout)
        assert cfg.text is not None
        self.cross: CrossAttention | None = None
        if cfg.text.mode == "cross":
            self.norm_cross = RMSNorm(cfg.hidden_size)
            self.cross = CrossAttention(cfg.hidden_size, cfg.num_heads, cfg.use_qknorm)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        c: Tensor,
        rope: AxialRoPE | None,
        mask: Tensor | None = None,
        ctx: Tensor | None = None,
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask if ctx is None else None)
        x = torch.addcmul(x, gate1.unsqueeze(1), h)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), ctx, mask)
        x = torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x


class TextJiT(JiT):
    """JiT conditioned on a prompt's token ids instead of a class label (module doc)."""

    block_type = TextJiTBlock

    def __init__(self, config: JiTConfig) -> None:
        if config.text is None:
            raise ValueError("TextJiT needs a JiTConfig with text (model.text)")
        super().__init__(config, cond_embedder=TextConditioner(config.text, config.hidden_size))
        self.text_len = 1 + config.text.max_len  # null token + prompt tokens
        self.rope_text: AxialRoPE | None = None
        if config.use_rope and config.text.mode == "joint":
            self.rope_text = AxialRoPE(config.head_dim, config.grid_size, self.text_len)

    @property
    def text(self) -> TextConditioner:
        return self.cond_embedder  # type: ignore[return-value]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.text.reset_parameters()
        for block in self.blocks:
            if block.cross is not None:  # a block starts as identity (adaLN-Zero's rule)
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)

    def forward(
        self, z_t: Tensor, t: Tensor, y: Tensor, *, hidden_out: dict[int, Tensor] | None = None
    ) -> Tensor:
        """z_t [B, C, H, W], t [B] (t = 1 is data), y = token ids int64 [B, max_len]
        (``PAD`` = -1). ``hidden_out`` as :meth:`JiT.forward` (image tokens only)."""
        _check_input(self.config, z_t)
        ctx, keep = self.text(y)  # [B, T, D], [B, T]
        c = self.t_embedder(t)  # time only in adaLN
        x = self.patch_embed(z_t) + self.pos_embed.to(z_t.dtype)  # [B, N, D]
        joint = self.config.text.mode == "joint"  # type: ignore[union-attr]
        prefix = 0
        if joint:
            prefix = ctx.shape[1]
            x = torch.cat([ctx.to(x.dtype), x], dim=1)
            keep = torch.cat([keep, keep.new_ones(x.shape[0], x.shape[1] - prefix)], dim=1)
        mask = keep[:, None, None, :]  # [B, 1, 1, keys]
        rope = self.rope_text if joint else self.rope
        context = None if joint else ctx.to(x.dtype)  # cross-attention keys/values
        for i, block in enumerate(self.blocks):
            x = block(x, c, rope, mask, context)
            if hidden_out is not None and i in hidden_out:
                hidden_out[i] = x[:, prefix:]
        return self.unpatchify(self.final_layer(x[:, prefix:], c))


def attach_encoder(net: TextJiT, encoder: nn.Module) -> TextJiT:
    """Give ``net`` its frozen text encoder (held outside the module tree)."""
    net.text.__dict__["frozen"] = encoder
    return net


def share_text_encoder(dst: nn.Module, src: nn.Module) -> None:
    """Give ``dst`` the frozen text encoder of ``src`` (both text networks; else a no-op)."""
    if isinstance(dst, TextJiT) and isinstance(src, TextJiT):
        attach_encoder(dst, src.text.__dict__["frozen"])
