"""The eager fast paths of ``models.fused`` against the plain formulas they replace: the
forward bit for bit where promised, the gradients against autograd of the plain formula
(float64 references), and each path used exactly where it claims to be."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from denoiselab.models import AxialRoPE, apply_rope, axial_rope_angles, build_model
from denoiselab.models import layers as layers_module
from denoiselab.models.fused import (
    attention,
    complex_rope_applies,
    explicit_attention_applies,
    rms_norm,
    rope_complex,
    swiglu,
)
from denoiselab.models.layers import RMSNorm, modulate


def _plain_rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """The formula RMSNorm keeps under torch.compile (and the official code's)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (w * x32).to(x.dtype)


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(fn, x: Tensor, w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    fn(x, w).backward(g)
    return x.grad, w.grad


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm_forward_is_the_plain_formula_and_its_backward_is_exact(strided: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    if strided:  # the qk-norm input: a head of a [B, N, 3, H, hd] projection, permuted
        x = torch.randn(4, 9, 3, 2, 32, generator=gen).permute(2, 0, 3, 1, 4)[1] * 3
    else:
        x = torch.randn(4, 9, 48, generator=gen) * 3
    w = 1 + 0.3 * torch.randn(x.shape[-1], generator=gen)
    g = torch.randn(x.shape, generator=gen)
    assert torch.equal(rms_norm(x, w, 1e-6), _plain_rms(x, w, 1e-6))
    gx, gw = _grads(lambda a, b: rms_norm(a, b, 1e-6), x, w, g)
    rx, rw = _grads(lambda a, b: _plain_rms(a, b, 1e-6), x.double(), w.double(), g.double())
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    assert _rel(gx, rx) < 1e-6 and _rel(gw, rw) < 1e-6
    # a wrong backward (e.g. without the projection term) is far outside that tolerance
    assert _rel(g * w * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), rx) > 1e-2


def test_rms_norm_in_bf16_returns_bf16_and_matches_float32_maths() -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, 64, generator=gen) * 2).bfloat16()
    w = 1 + 0.3 * torch.randn(64, generator=gen)
    g = torch.randn(3, 7, 64, generator=gen).bfloat16()
    assert torch.equal(rms_norm(x, w, 1e-6), _plain_rms(x, w, 1e-6))
    gx, gw = _grads(lambda a, b: rms_norm(a, b, 1e-6), x, w, g)
    rx, rw = _grads(lambda a, b: _plain_rms(a, b, 1e-6), x.double(), w.double(), g.double())
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert _rel(gx, rx) < 1e-2 and _rel(gw, rw) < 1e-5


def test_rms_norm_module_uses_the_fast_path_in_eager_only(monkeypatch) -> None:
    norm = RMSNorm(16)
    x = torch.randn(2, 5, 16)
    calls: list[int] = []
    real = layers_module.rms_norm
    monkeypatch.setattr(layers_module, "rms_norm", lambda *a: calls.append(1) or real(*a))
    eager = norm(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = norm(x)
    assert calls == [1] and torch.equal(eager, traced)


# --------------------------------------------------------------------------- RoPE


def _tables(head_dim: int, grid: int, prefix: int) -> tuple[Tensor, Tensor]:
    idx = torch.arange(grid * grid)
    angles = axial_rope_angles(idx // grid, idx % grid, head_dim)
    angles = torch.cat([torch.zeros(prefix, head_dim // 2), angles])
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize(("grid", "prefix"), [(8, 8), (4, 3), (3, 0)])
def test_complex_rope_equals_the_pairwise_rotation(head_dim: int, grid: int, prefix: int) -> None:
    """Bit for bit on x86 (AVX2/AVX-512: the complex product is a vector multiply and a
    horizontal subtract/add, no fused multiply-add); within one rounding elsewhere."""
    cos, sin = _tables(head_dim, grid, prefix)
    n = prefix + grid * grid
    gen = torch.Generator().manual_seed(head_dim + n)
    contiguous = torch.randn(2, 3, n, head_dim, generator=gen) * 4
    strided = torch.randn(2, n, 3, 3, head_dim, generator=gen).permute(2, 0, 3, 1, 4)[1]
    for x in (contiguous, strided):
        assert complex_rope_applies(x)
        fast, ref = rope_complex(x, cos, sin), apply_rope(x, cos, sin)
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            assert torch.equal(fast, ref)
        torch.testing.assert_close(fast, ref, rtol=2e-7, atol=2e-6)
        assert not torch.allclose(fast, x, atol=1e-3)
    # gradients: the adjoint rotation, against autograd of the pairwise form in float64
    g = torch.randn(contiguous.shape, generator=gen)
    x = contiguous.clone().requires_grad_()
    rope_complex(x, cos, sin).backward(g)
    x64 = contiguous.double().requires_grad_()
    apply_rope(x64, cos.double(), sin.double()).backward(g.double())
    assert _rel(x.grad, x64.grad) < 1e-6


def test_complex_rope_applies_only_to_cpu_float32_whole_vectors() -> None:
    x = torch.randn(2, 3, 5, 64)
    assert complex_rope_applies(x)
    assert not complex_rope_applies(x.bfloat16())
    assert not complex_rope_applies(x.double())
    assert not complex_rope_applies(torch.randn(2, 3, 5, 16))  # rows not whole vectors
    assert not complex_rope_applies(torch.randn(2, 3, 5, 64, device="meta"))
    # pairs that cannot be viewed as complex in place (odd storage offset) are copied first
    odd = torch.randn(2, 3, 5, 65)[..., 1:]
    assert odd.storage_offset() % 2 == 1 and complex_rope_applies(odd)
    cos, sin = torch.rand(5, 32), torch.rand(5, 32)
    torch.testing.assert_close(rope_complex(odd, cos, sin), apply_rope(odd, cos, sin))


def test_axial_rope_takes_the_complex_path_when_it_applies(monkeypatch) -> None:
    calls: list[int] = []
    real = layers_module.rope_complex
    monkeypatch.setattr(layers_module, "rope_complex", lambda *a: calls.append(1) or real(*a))
    rope32, rope16 = AxialRoPE(32, 4, num_prefix=2), AxialRoPE(16, 4, num_prefix=2)
    x32, x16 = torch.randn(2, 3, 18, 32), torch.randn(2, 3, 18, 16)
    cos, sin = _tables(32, 4, 2)
    assert torch.equal(rope32(x32), apply_rope(x32, cos, sin)) and calls == [1]
    rope16(x16)  # head_dim 16: the index form
    rope32(x32.bfloat16())  # bf16: the index form
    assert calls == [1]


# --------------------------------------------------------------------------- adaLN


def test_modulate_and_gated_residual_match_their_formulas() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 8, generator=gen)
    shift, scale = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    expected = x * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(modulate(x, shift, scale), expected, rtol=1e-6, atol=1e-6)
    # a JiT block against the same block written with the plain formulas
    model = build_model("JiT-Micro")
    block = model.blocks[0]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        h, c = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 64, generator=gen)
        s1, sc1, g1, s2, sc2, g2 = block.ada(c)
        ref = h + g1[:, None] * block.attn(
            block.norm1(h) * (1 + sc1[:, None]) + s1[:, None], model.rope
        )
        ref = ref + g2[:, None] * block.mlp(block.norm2(ref) * (1 + sc2[:, None]) + s2[:, None])
        torch.testing.assert_close(block(h, c, model.rope), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SwiGLU


def test_swiglu_forward_is_the_plain_formula_and_its_backward_is_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    x12 = torch.randn(4, 9, 2 * 24, generator=gen) * 2
    g = torch.randn(4, 9, 24, generator=gen)
    x1, x2 = x12.chunk(2, dim=-1)
    assert torch.equal(swiglu(x12), torch.nn.functional.silu(x1) * x2)
    x = x12.clone().requires_grad_()
    swiglu(x).backward(g)
    x64 = x12.double().requires_grad_()
    a, b = x64.chunk(2, dim=-1)
    (torch.nn.functional.silu(a) * b).backward(g.double())
    assert _rel(x.grad, x64.grad) < 1e-6
    # swapping the halves' gradients (the easy mistake) is far outside that tolerance
    assert _rel(torch.cat(x.grad.chunk(2, dim=-1)[::-1], dim=-1), x64.grad) > 0.5


# --------------------------------------------------------------------------- attention


def _qkv(n_q: int, n_k: int, seed: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, n_q, 32, generator=gen)
    k, v = torch.randn(2, 3, n_k, 32, generator=gen), torch.randn(2, 3, n_k, 32, generator=gen)
    return q, k, v


def test_explicit_attention_equals_sdpa_forward_and_backward() -> None:
    q, k, v = _qkv(20, 20)
    # v as the JiT attention splits it from a fused projection: heads interleaved
    v = torch.randn(2, 20, 3, 3, 32).unbind(2)[2].transpose(1, 2)
    assert explicit_attention_applies(q, k, None)
    g = torch.randn(q.shape)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*ins)
    out.backward(g)
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_ins)
    ref.backward(g.double())
    assert _rel(out, ref) < 1e-6
    for mine, theirs in zip(ins, ref_ins, strict=True):
        assert _rel(mine.grad, theirs.grad) < 1e-5


def test_attention_takes_the_explicit_product_only_where_it_applies(monkeypatch) -> None:
    from denoiselab.models import fused

    calls: list[int] = []
    real = fused._short_attention
    monkeypatch.setattr(fused, "_short_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(8, fused.SHORT_KEYS)
    fused.attention(q, k, v)
    assert calls == [1]
    mask = torch.ones(2, 1, 1, fused.SHORT_KEYS, dtype=torch.bool)
    fused.attention(q, k, v, mask)  # masked: SDPA
    fused.attention(q.double(), k.double(), v.double())  # not float32: SDPA
    q, k, v = _qkv(8, fused.SHORT_KEYS + 1)
    fused.attention(q, k, v)  # many keys: SDPA's tiled kernel
    assert calls == [1]


def test_the_opaque_operators_pass_torch_library_opcheck() -> None:
    """Schema, fake (meta) kernels, autograd registration and AOT tracing of the custom
    operators that ``torch.compile`` sees; a fake kernel with other strides than the real
    one fails here (and in inductor's stride assertions)."""
    q, k, v = _qkv(10, 10)
    v = torch.randn(2, 10, 3, 3, 32).unbind(2)[2].transpose(1, 2)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.denoiselab.short_attention.default, tuple(ins))
    x = torch.randn(2, 10, 3, 3, 32).unbind(2)[0].transpose(1, 2).requires_grad_()
    cos, sin = torch.rand(10, 16), torch.rand(10, 16)
    torch.library.opcheck(torch.ops.denoiselab.rope_rotate.default, (x, cos, sin))


def test_compiled_training_step_matches_eager_through_the_custom_operators() -> None:
    """The network under AOT autograd (what inductor compiles, without code generation):
    same loss and gradients as eager, RoPE and attention as opaque operators."""
    torch._dynamo.reset()
    model = build_model("JiT-Micro")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    cfg = model.config
    z = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    t, y = torch.rand(3, generator=gen), torch.tensor([0, 1, 2])
    assert cfg.head_dim % 32 == 0  # the complex RoPE and explicit attention apply

    def grads(net) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad()
        out = net(z, t, y)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_e, g_e = grads(model)
    out_c, g_c = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
