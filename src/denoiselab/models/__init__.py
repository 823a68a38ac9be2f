"""JiT networks, their building blocks, the size registry, cost accounting and the toy MLP.

A network maps ``(z_t [B, C, H, W], t [B], y [B])`` to a raw output shaped like ``z_t``
(t = 1 is data, t = 0 is noise; ``y == num_classes`` is the null class). A text network
(:class:`~.text_jit.TextJiT`, ``JiTConfig.text``) takes token ids ``y [B, L]`` instead
(``-1`` = padding; all padding = the empty prompt); :func:`build_network` builds either.
"""

from .flops import count_params, describe, forward_macs
from .jit import JiT, JiTBlock, JiTConfig
from .layers import (
    Attention,
    AxialRoPE,
    ClassEmbedder,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    axial_rope_angles,
    sincos_pos_embed_2d,
)
from .mlp import ToyMLP
from .registry import MODEL_PRESETS, build_model, build_network, model_config

__all__ = [
    "MODEL_PRESETS",
    "Attention",
    "AxialRoPE",
    "ClassEmbedder",
    "JiT",
    "JiTBlock",
    "JiTConfig",
    "PatchEmbed",
    "RMSNorm",
    "SwiGLU",
    "TimestepEmbedder",
    "ToyMLP",
    "apply_rope",
    "axial_rope_angles",
    "build_model",
    "build_network",
    "count_params",
    "describe",
    "forward_macs",
    "model_config",
    "sincos_pos_embed_2d",
]
