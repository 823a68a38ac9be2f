"""Parameter and forward-cost accounting for JiT configs.

What is counted: multiply-accumulates (MACs) of every linear layer (including the patch
embedding, the time-embedding MLP and the adaLN projections) and of the two attention
matmuls (``q·kᵀ`` and ``attn·v``, ``2·n²·D`` per block). Norms, activations, RoPE, softmax
and additions are not counted. 1 MAC = 2 FLOPs.

The JiT paper's "Gflops" (Table 5: JiT-B/16 at 256 → 25) are MACs in this sense, the DiT
convention: JiT-B/16 at 256 is ≈ 25 GMACs ≈ 50 GFLOPs per image.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .jit import JiTConfig
from .layers import swiglu_hidden
from .registry import build_network, model_config

TIME_FREQ_DIM = 256  # sinusoidal features fed to the time-embedding MLP


def _resolve(cfg: JiTConfig | str) -> JiTConfig:
    return model_config(cfg) if isinstance(cfg, str) else cfg


PLACEHOLDER_VOCAB, PLACEHOLDER_LEN = 64, 32  # text sizes counted before the data gives them


def with_placeholder_text(cfg: JiTConfig) -> JiTConfig:
    """``cfg`` with an unresolved ``model.text`` given placeholder sizes (a 64-word
    vocabulary, 32 tokens, D_text = width), so a preset's parameters can be counted."""
    text = cfg.text
    if text is None or text.resolved:
        return cfg
    vocab = text.vocab or tuple(f"w{i}" for i in range(PLACEHOLDER_VOCAB))
    return replace(
        cfg,
        text=replace(
            text,
            dim=text.dim or cfg.hidden_size,
            max_len=text.max_len or PLACEHOLDER_LEN,
            vocab=vocab if text.encoder == "words" else (),
        ),
    )


def count_params(cfg_or_model: JiTConfig | str | nn.Module) -> int:
    """Number of parameters (fixed sin-cos position embedding excluded: it is a buffer).

    A config or preset name is built on the meta device, so even JiT-G costs no memory. A
    frozen transformers text encoder is not part of the network and is not counted.
    """
    if isinstance(cfg_or_model, nn.Module):
        model = cfg_or_model
    else:
        with torch.device("meta"):
            model = build_network(with_placeholder_text(_resolve(cfg_or_model)), load_encoder=False)
    return sum(p.numel() for p in model.parameters())


def forward_macs(cfg: JiTConfig | str, *, routed: bool = False) -> dict[str, float]:
    """Analytic forward cost of one image, by part (MACs) plus ``total``, ``gmacs``, ``gflops``.

    With token routing (``cfg.routing``), ``routed=True`` gives the cost of a routed training
    forward: the routed blocks see ``K = routing.num_kept(N)`` patch tokens (plus the
    in-context tokens, never routed); the default is the full network that samples. SPRINT's
    fusion ``Linear(2D → D)`` on the N patch tokens is counted in both (``routing`` part).
    """
    cfg = _resolve(cfg)
    d, n, k = cfg.hidden_size, cfg.num_patches, cfg.in_context_len
    routing = cfg.routing
    routed_blocks = routing.blocks(cfg.depth) if routing.enabled and routed else range(0)
    kept = routing.num_kept(n) if routing.enabled else n
    embed_width = d if cfg.bottleneck is None else cfg.bottleneck
    patch_embed = n * cfg.patch_dim * embed_width + (
        0 if cfg.bottleneck is None else n * embed_width * d
    )
    conditioning = TIME_FREQ_DIM * d + d * d + cfg.depth * d * 6 * d + d * 2 * d  # per image
    per_token = 4 * d * d + 3 * d * swiglu_hidden(d, cfg.mlp_ratio)  # qkv+proj, SwiGLU
    block_linear = attention = 0
    for i in range(cfg.depth):
        tokens = (kept if i in routed_blocks else n) + (k if i >= cfg.in_context_start else 0)
        block_linear += tokens * per_token
        attention += 2 * tokens * tokens * d
    final = n * d * cfg.patch_dim
    parts = dict(
        patch_embed=patch_embed,
        conditioning=conditioning,
        block_linear=block_linear,
        attention=attention,
        routing=n * 2 * d * d if routing.kind == "sprint" else 0,
        final=final,
    )
    total = sum(parts.values())
    out = {key: float(value) for key, value in parts.items()}
    return {**out, "total": float(total), "gmacs": total / 1e9, "gflops": 2 * total / 1e9}


def describe(name: str, image_size: int | None = None) -> str:
    """Human-readable summary of a preset (for ``denoiselab info MODEL [--image-size N]``).

    Changing ``image_size`` keeps the patch size and changes the sequence length.
    """
    cfg = model_config(name) if image_size is None else model_config(name, image_size=image_size)
    return describe_config(name, cfg)


def describe_config(name: str, cfg: JiTConfig) -> str:
    """:func:`describe` of a resolved network config."""
    macs = forward_macs(cfg)
    in_ctx = (
        f" + {cfg.in_context_len} in-context from block {cfg.in_context_start}"
        if cfg.in_context_len
        else ""
    )
    embed = f"bottleneck {cfg.bottleneck}" if cfg.bottleneck else "plain"
    text = []
    if cfg.text is not None:
        t = cfg.text
        sizes = (
            (f"{len(t.vocab)} words" if t.encoder == "words" else f"D_text {t.dim}")
            + f", {t.max_len} tokens"
            if t.resolved
            else f"counted with {PLACEHOLDER_VOCAB} words, {PLACEHOLDER_LEN} tokens until the "
            "data resolves them"
        )
        text = [
            f"text: {t.mode} attention, encoder {t.encoder} ({sizes}); forward cost below "
            "counts image tokens only; a frozen transformers encoder is not counted"
        ]
    return "\n".join(
        [
            f"model: {name}",
            f"input: {cfg.in_channels}×{cfg.image_size}×{cfg.image_size}, patch {cfg.patch_size} "
            f"({cfg.patch_dim}-d, {embed} embedding)",
            f"tokens: {cfg.num_patches}{in_ctx}",
            f"width {cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, "
            f"dropout {cfg.dropout}, classes {cfg.num_classes}",
            *text,
            f"params: {count_params(cfg) / 1e6:.1f}M",
            f"forward: {macs['gmacs']:.2f} GMACs / {macs['gflops']:.2f} GFLOPs per image "
            "(linear layers + attention matmuls; 1 MAC = 2 FLOPs)",
        ]
    )
