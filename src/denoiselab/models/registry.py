"""Named model sizes (seeds/003 Table 9; JLT presets; tiny CPU presets).

``MODEL_PRESETS`` maps a name to :class:`JiTConfig` keyword arguments. A preset is a
baseline; ``build_model(name, **overrides)`` changes any field (e.g. ``image_size=512``
keeps the patch size and so changes the sequence length).
"""

from __future__ import annotations

from typing import Any

from .jit import JiT, JiTConfig

# Table 9: depth, width, heads, bottleneck d′, dropout, in-context start block.
_JIT_SIZES: dict[str, dict[str, Any]] = {
    "B": dict(depth=12, hidden_size=768, num_heads=12, bottleneck=128, dropout=0.0),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck=128, dropout=0.0),
    "H": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck=256, dropout=0.2),
    "G": dict(depth=40, hidden_size=1664, num_heads=16, bottleneck=256, dropout=0.2),
}
_IN_CONTEXT_START = {"B": 4, "L": 8, "H": 10, "G": 10}
_IMAGE_SIZE_FOR_PATCH = {16: 256, 32: 512, 64: 1024}  # sequence length 16×16 (Table 5)


def _jit_preset(size: str, patch: int) -> dict[str, Any]:
    return dict(
        _JIT_SIZES[size],
        image_size=_IMAGE_SIZE_FOR_PATCH[patch],
        patch_size=patch,
        in_channels=3,
        num_classes=1000,
        in_context_len=32,
        in_context_start=_IN_CONTEXT_START[size],
    )


def _jlt_preset(patch: int) -> dict[str, Any]:
    """JLT-B on 128-channel 16×16 latents (FLUX.2-style codes): plain patch embedding."""
    return dict(
        image_size=16,
        patch_size=patch,
        in_channels=128,
        hidden_size=768,
        depth=12,
        num_heads=12,
        bottleneck=None,
        num_classes=1000,
        in_context_len=0,
    )


def _cpu_preset(**fields: Any) -> dict[str, Any]:
    """Small pixel models for laptops and tests: 32×32, patch 4, 10 classes by default."""
    base = dict(
        image_size=32,
        patch_size=4,
        in_channels=3,
        bottleneck=32,
        num_classes=10,
        in_context_len=8,
        in_context_start=2,
    )
    return {**base, **fields}


def _text(preset: dict[str, Any], mode: str = "joint", **text: Any) -> dict[str, Any]:
    """A text-conditioned copy of ``preset``: no in-context class tokens, ``model.text``
    defaults to the offline ``words`` encoder (a run's config can name a transformers one)."""
    return {**preset, "in_context_len": 0, "text": {"mode": mode, "encoder": "words", **text}}


def _prx(patch: int) -> dict[str, Any]:
    """PRX-like ≈1.2B single-stream text-to-image model (seeds/002: width 1792, depth 16,
    28 heads). The logbook gives no MLP width: ratio 6.5 brings the total to ≈1.2B.
    Patch 32 on 1024-px pixels (JiT-style, bottleneck 256) or patch 2 on 256-px Flux-VAE
    latents (16 channels, 32×32 cells)."""
    pixels = patch >= 8
    return _text(
        dict(
            image_size=1024 if pixels else 32,
            patch_size=patch,
            in_channels=3 if pixels else 16,
            hidden_size=1792,
            depth=16,
            num_heads=28,
            mlp_ratio=6.5,
            bottleneck=256 if pixels else None,
            num_classes=1,
        )
    )


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "JiT-B/16": _jit_preset("B", 16),
    "JiT-B/32": _jit_preset("B", 32),
    "JiT-B/64": _jit_preset("B", 64),
    "JiT-L/16": _jit_preset("L", 16),
    "JiT-L/32": _jit_preset("L", 32),
    "JiT-H/16": _jit_preset("H", 16),
    "JiT-H/32": _jit_preset("H", 32),
    "JiT-G/16": _jit_preset("G", 16),
    "JiT-G/32": _jit_preset("G", 32),
    "JLT-B/1": _jlt_preset(1),
    "JLT-B/2": _jlt_preset(2),
    # CPU reference configuration for benchmarks (32×32 images, 64 patch tokens).
    "JiT-T/4": _cpu_preset(hidden_size=192, depth=6, num_heads=3),
    "JiT-S/4": _cpu_preset(hidden_size=256, depth=8, num_heads=4),
    # The quickstart model: large patches as in JiT (8·8·3 = 192-d tokens, 16 of them),
    # x-prediction's regime, and 4× fewer tokens than /4 — what a laptop trains in minutes.
    "JiT-S/8": _cpu_preset(
        patch_size=8,
        hidden_size=256,
        depth=6,
        num_heads=4,
        bottleneck=64,
        in_context_len=4,
        in_context_start=2,
    ),
    # Unit-test size: builds and runs in milliseconds.
    "JiT-Micro": _cpu_preset(
        image_size=16,
        hidden_size=64,
        depth=2,
        num_heads=2,
        bottleneck=16,
        in_context_len=4,
        in_context_start=1,
    ),
}
# Text-to-image presets: the same sizes with text tokens in joint attention.
MODEL_PRESETS.update(
    {
        "JiT-Micro-T2I": _text(MODEL_PRESETS["JiT-Micro"]),
        "JiT-T/4-T2I": _text(MODEL_PRESETS["JiT-T/4"]),
        "JiT-S/8-T2I": _text(MODEL_PRESETS["JiT-S/8"]),
        "JiT-B/16-T2I": _text(MODEL_PRESETS["JiT-B/16"]),
        "PRX-1.2B/32": _prx(32),
        "PRX-1.2B/2": _prx(2),
    }
)


def model_config(name: str, **overrides: Any) -> JiTConfig:
    """The validated :class:`JiTConfig` of preset ``name`` with ``overrides`` applied."""
    if name not in MODEL_PRESETS:
        valid = ", ".join(MODEL_PRESETS)
        raise ValueError(f"unknown model {name!r}; valid names: {valid}")
    unknown = set(overrides) - set(JiTConfig.__dataclass_fields__)
    if unknown:
        valid = ", ".join(JiTConfig.__dataclass_fields__)
        raise TypeError(f"unknown JiTConfig field(s) {sorted(unknown)}; valid fields: {valid}")
    return JiTConfig(**{**MODEL_PRESETS[name], **overrides})


def build_model(name: str, **overrides: Any) -> JiT:
    """Build preset ``name`` (see ``MODEL_PRESETS``) with ``overrides`` applied."""
    return build_network(model_config(name, **overrides))


def build_network(cfg: JiTConfig, *, load_encoder: bool = True) -> JiT:
    """The network of ``cfg``: :class:`JiT`, or :class:`~.text_jit.TextJiT` when ``cfg.text``
    is set (its frozen transformers encoder loaded from ``cfg.text.path`` unless
    ``load_encoder`` is False, e.g. for counting parameters)."""
    if cfg.text is None:
        return JiT(cfg)
    from .text_jit import TextJiT, attach_encoder

    net = TextJiT(cfg)
    if load_encoder and cfg.text.encoder != "words":
        from denoiselab.text.hf import LazyTextEncoder, load_text_encoder

        # with cached embeddings training never runs it: load it when a prompt is sampled
        text = cfg.text
        attach_encoder(net, LazyTextEncoder(text) if text.cache else load_text_encoder(text))
    return net
