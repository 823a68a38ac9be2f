"""The official JiT network's state dict ⇄ denoiselab's :class:`~denoiselab.models.JiT`.

The official code (``model_jit.py`` of LTH14/JiT, wrapped as ``Denoiser.net``) and
denoiselab's network compute the same function; only names and two layouts differ:

=========================================  ==========================================
official (after the ``net.`` prefix)        denoiselab
=========================================  ==========================================
``y_embedder.embedding_table.weight``       ``cond_embedder.table.weight``
``x_embedder.proj1.weight [d′, C, p, p]``   ``patch_embed.proj1.weight`` (same)
``x_embedder.proj2.weight [D, d′, 1, 1]``   ``patch_embed.proj2.weight [D, d′]`` (1×1 conv → linear)
``in_context_posemb [1, L, D]``             ``in_context_pos``
``blocks.i.adaLN_modulation.1.*``           ``blocks.i.ada.linear.*``
``final_layer.norm_final.weight``           ``final_layer.norm.weight``
``final_layer.adaLN_modulation.1.*``        ``final_layer.ada.linear.*``
``blocks.i.mlp.w1/w2.*`` (some forks)       ``blocks.i.mlp.w12.*`` = ``cat([w1, w2])``
=========================================  ==========================================

Everything else (``t_embedder.mlp.{0,2}``, ``blocks.i.{norm1,norm2}``, ``attn.{qkv,q_norm,
k_norm,proj}``, ``mlp.{w12,w3}``, ``final_layer.linear``) keeps its name. The fixed tables
``pos_embed`` (a frozen parameter there, a derived buffer here) and the RoPE buffers
``feat_rope[_incontext].freqs_{cos,sin}`` are not copied: they are checked against
denoiselab's own tables, so a fork with another position encoding is refused, not converted
into a silently different network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from denoiselab.interop import ConvertError
from denoiselab.models import JiT, JiTConfig, sincos_pos_embed_2d
from denoiselab.models.layers import AxialRoPE, swiglu_hidden

# denoiselab name pattern → official name template (re.sub replacement)
_RENAME = (
    (r"^cond_embedder\.table\.", "y_embedder.embedding_table."),
    (r"^patch_embed\.", "x_embedder."),
    (r"^in_context_pos$", "in_context_posemb"),
    (r"^(blocks\.\d+)\.ada\.linear\.", r"\1.adaLN_modulation.1."),
    (r"^final_layer\.ada\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"^final_layer\.norm\.", "final_layer.norm_final."),
)
DERIVED = re.compile(r"^(pos_embed|feat_rope(_incontext)?\.freqs_(cos|sin))$")
_TABLE_ATOL = 1e-4  # float32 tables computed two ways agree to ~1e-6; a layout change is O(1)


def official_name(ours: str) -> str:
    """The official parameter name of denoiselab parameter ``ours`` (prefix ``net.`` removed)."""
    for pattern, template in _RENAME:
        new, n = re.subn(pattern, template, ours)
        if n:
            return new
    return ours


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` (DDP) and ``net.`` (``Denoiser``) prefixes shared by every key."""
    out = dict(state)
    for prefix in ("module.", "net."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def fuse_split_swiglu(state: dict[str, Tensor]) -> bool:
    """Replace ``mlp.w1``/``mlp.w2`` pairs by the fused ``mlp.w12 = cat([w1, w2])`` (in place);
    ``silu`` acts on the ``w1`` half, as on the first chunk of ``w12``. True if any was fused."""
    fused = False
    for key in [k for k in state if re.search(r"\.mlp\.w1\.(weight|bias)$", k)]:
        other = key.replace(".w1.", ".w2.")
        if other in state:
            state[key.replace(".w1.", ".w12.")] = torch.cat([state.pop(key), state.pop(other)])
            fused = True
    return fused


def infer_config(
    state: Mapping[str, Tensor], *, in_context_start: int, image_size: int | None, dropout: float
) -> JiTConfig:
    """The :class:`JiTConfig` that ``state`` (official names, prefixes stripped) was trained with.

    Shapes give the width D (``t_embedder.mlp.0.weight [D, 256]``), depth, patch p, channels C
    and bottleneck d′ (``x_embedder.proj1.weight [d′, C, p, p]``), heads (``D / head_dim`` with
    ``head_dim`` from ``q_norm.weight``), classes (embedding rows − 1), the in-context length
    (``in_context_posemb [1, L, D]``) and the image side (``pos_embed [1, (H/p)², D]``; else
    ``image_size``). ``in_context_start`` is not in the weights: it comes from the model name.
    """
    d = _need(state, "t_embedder.mlp.0.weight").shape[0]
    bottleneck, channels, p, _ = _need(state, "x_embedder.proj1.weight").shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise ConvertError("the checkpoint has no 'blocks.<i>.*' parameters: not a JiT network")
    head_dim = _need(state, "blocks.0.attn.q_norm.weight").shape[0]
    if d % head_dim:
        raise ConvertError(
            f"blocks.0.attn.q_norm.weight has {head_dim} entries, not a divisor of {d}"
        )
    pos = state.get("pos_embed")
    if pos is not None:
        grid = round(pos.shape[1] ** 0.5)
        if grid * grid != pos.shape[1]:
            raise ConvertError(f"pos_embed has {pos.shape[1]} tokens: not a square grid")
        if image_size is not None and image_size != grid * p:
            raise ConvertError(
                f"args.img_size={image_size} but pos_embed has a {grid}×{grid} grid of "
                f"{p}-pixel patches ({grid * p} pixels)"
            )
        image_size = grid * p
    if image_size is None:
        raise ConvertError("no pos_embed and no args.img_size: the image size is unknown")
    context = state.get("in_context_posemb")
    try:
        cfg = JiTConfig(
            image_size=image_size,
            patch_size=p,
            in_channels=channels,
            hidden_size=d,
            depth=depth,
            num_heads=d // head_dim,
            bottleneck=bottleneck,
            dropout=dropout,
            num_classes=_need(state, "y_embedder.embedding_table.weight").shape[0] - 1,
            in_context_len=0 if context is None else context.shape[1],
            in_context_start=in_context_start if context is not None else 0,
        )
    except ValueError as e:
        raise ConvertError(f"the checkpoint's shapes give an invalid network: {e}") from e
    w12 = _need(state, "blocks.0.mlp.w12.weight").shape[0]
    if w12 != 2 * swiglu_hidden(d, cfg.mlp_ratio):
        raise ConvertError(
            f"blocks.0.mlp.w12.weight has {w12} rows; mlp_ratio 4 (official) gives "
            f"{2 * swiglu_hidden(d, cfg.mlp_ratio)}"
        )
    return cfg


def _need(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ConvertError(f"the checkpoint lacks {key!r} (official JiT layout)")
    return state[key]


def expected_shapes(cfg: JiTConfig) -> dict[str, tuple[int, ...]]:
    """denoiselab parameter name → shape, in ``JiT(cfg).state_dict()`` order (no memory used)."""
    with torch.device("meta"):
        net = JiT(replace(cfg, dropout=0.0))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def to_denoiselab(state: Mapping[str, Tensor], cfg: JiTConfig, *, where: str) -> dict[str, Tensor]:
    """Official state dict (prefixes stripped, w12 fused) → denoiselab's, checked key by key.

    Missing or unexpected keys, shape mismatches and fixed tables that differ from
    denoiselab's raise :class:`ConvertError` naming the key; ``where`` names the dict in the
    checkpoint (``model``, ``model_ema1`` …).
    """
    shapes = expected_shapes(cfg)
    names = {ours: official_name(ours) for ours in shapes}
    missing = [o for o in names.values() if o not in state]
    unexpected = [k for k in state if k not in set(names.values()) and not DERIVED.match(k)]
    if missing:
        raise ConvertError(f"{where}: missing key(s) {_short(missing)} (official JiT layout)")
    if unexpected:
        raise ConvertError(
            f"{where}: unexpected key(s) {_short(unexpected)}: not part of the official JiT "
            "layout this converter knows"
        )
    out: dict[str, Tensor] = {}
    for ours, official in names.items():
        tensor = state[official]
        if ours == "patch_embed.proj2.weight" and tensor.dim() == 4:
            tensor = tensor.flatten(1)  # 1×1 conv [D, d′, 1, 1] ≡ linear [D, d′]
        if tuple(tensor.shape) != shapes[ours]:
            raise ConvertError(
                f"{where}: {official!r} has shape {list(tensor.shape)}; the network implied by "
                f"the other weights needs {list(shapes[ours])}"
            )
        out[ours] = tensor.float()
    check_tables(state, cfg, where)
    return out


def check_tables(state: Mapping[str, Tensor], cfg: JiTConfig, where: str) -> None:
    """The official fixed tables, where the checkpoint holds them, equal denoiselab's."""
    ours: dict[str, Tensor] = {"pos_embed": sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)}
    for name, prefix in (("feat_rope", 0), ("feat_rope_incontext", cfg.in_context_len)):
        rope = AxialRoPE(cfg.head_dim, cfg.grid_size, prefix)
        ours[f"{name}.freqs_cos"] = rope.cos
        # official: x·cos + rotate_half(x)·sin with rotate_half = (−x₂, x₁) per pair;
        # denoiselab: x·cos + swap(x)·sin′, so sin′ = (−sin, +sin) per pair.
        sign = torch.tensor([-1.0, 1.0]).repeat(cfg.head_dim // 2)
        ours[f"{name}.freqs_sin"] = rope.sin * sign
    for key, table in ours.items():
        if key not in state:
            continue
        theirs = state[key].float().reshape(-1, table.shape[-1])
        if theirs.shape != table.shape or not torch.allclose(theirs, table, atol=_TABLE_ATOL):
            raise ConvertError(
                f"{where}: {key!r} (shape {list(state[key].shape)}) is not the official "
                f"table denoiselab computes (shape {list(table.shape)}): a fork with another "
                "position encoding cannot be converted"
            )


def _short(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more
