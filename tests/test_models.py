"""Tests of denoiselab.models: JiT network, layers, registry, cost accounting, toy MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from denoiselab.models import (
    MODEL_PRESETS,
    AxialRoPE,
    JiT,
    JiTConfig,
    ToyMLP,
    apply_rope,
    axial_rope_angles,
    build_model,
    count_params,
    describe,
    forward_macs,
    model_config,
)

# Paper numbers (seeds/003 Tables 5, 7): parameters in millions at the preset image size.
PARAM_TARGETS_M = {
    "JiT-B/16": 131.1,
    "JiT-B/32": 133.2,
    "JiT-B/64": 141.5,
    "JiT-L/16": 458.9,
    "JiT-H/16": 952.5,
    "JiT-G/16": 2007.0,
}


def _inputs(cfg: JiTConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.arange(batch) % (cfg.num_classes + 1)  # includes the null class when batch > C
    return z, t, y


def _randomize(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Move every weight off its (partly zero) init so every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


# --------------------------------------------------------------------------- shapes, init


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("JiT-Micro", {}),
        ("JLT-B/1", dict(hidden_size=64, depth=2, num_heads=2, num_classes=10)),
        ("JLT-B/2", dict(hidden_size=64, depth=2, num_heads=2, num_classes=10)),
        ("JiT-Micro", dict(in_channels=16, use_rope=False, use_qknorm=False, in_context_len=0)),
    ],
)
def test_output_shape_matches_input(name: str, overrides: dict) -> None:
    model = _randomize(build_model(name, **overrides))
    z, t, y = _inputs(model.config)
    out = model(z, t, y)
    assert out.shape == z.shape
    assert torch.isfinite(out).all()


def test_plain_patch_embedding_when_no_bottleneck() -> None:
    cfg = model_config("JLT-B/1", hidden_size=64, depth=1, num_heads=2)
    model = JiT(cfg)
    assert model.patch_embed.proj1.weight.shape == (64, 128, 1, 1)
    assert isinstance(model.patch_embed.proj2, nn.Identity)


def test_zero_init_output_is_exactly_zero() -> None:
    model = build_model("JiT-Micro")
    z, t, y = _inputs(model.config, batch=3)
    assert torch.equal(model(z, t, y), torch.zeros_like(z))


def test_wrong_input_shape_is_rejected() -> None:
    model = build_model("JiT-Micro")
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_derived_tables_are_not_saved() -> None:
    keys = build_model("JiT-Micro").state_dict().keys()
    assert not [k for k in keys if "rope" in k or k == "pos_embed"]
    assert "in_context_pos" in keys


# --------------------------------------------------------------------------- RoPE


def _scores(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    ang = axial_rope_angles(rows, cols, q.shape[-1])
    qr, kr = apply_rope(q, ang.cos(), ang.sin()), apply_rope(k, ang.cos(), ang.sin())
    return qr @ kr.transpose(-1, -2)


def test_rope_scores_depend_only_on_relative_position() -> None:
    g = torch.Generator().manual_seed(0)
    n, head_dim = 10, 32
    q, k = torch.randn(2, 3, n, head_dim, generator=g), torch.randn(2, 3, n, head_dim, generator=g)
    rows = torch.randint(0, 8, (n,), generator=g)
    cols = torch.randint(0, 8, (n,), generator=g)
    base = _scores(q, k, rows, cols)
    shifted = _scores(q, k, rows + 5, cols - 3)  # same offset for every token
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    # ...but positions do matter: unrotated scores and a row/column swap both differ.
    assert not torch.allclose(base, q @ k.transpose(-1, -2), atol=1e-2)
    assert not torch.allclose(base, _scores(q, k, cols, rows), atol=1e-2)


def test_rope_keeps_norms_and_leaves_in_context_tokens_unrotated() -> None:
    rope = AxialRoPE(head_dim=16, grid=4, num_prefix=3)
    x = torch.randn(1, 2, 3 + 16, 16)
    out = rope(x)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, :, :3], x[:, :, :3])
    torch.testing.assert_close(out[:, :, 3], x[:, :, 3])  # patch (0, 0): angle 0
    assert not torch.allclose(out[:, :, 4], x[:, :, 4])


# --------------------------------------------------------------------------- in-context tokens


def test_in_context_tokens_affect_output_only_after_their_start_block() -> None:
    model = _randomize(build_model("JiT-Micro", depth=3, in_context_start=1)).eval()
    cfg = model.config
    z, t, y = _inputs(cfg)
    h0: dict[int, torch.Tensor] = {0: torch.empty(0), 2: torch.empty(0)}
    out0 = model(z, t, y, hidden_out=h0)
    assert out0.shape == z.shape and h0[2].shape == (2, cfg.num_patches, cfg.hidden_size)
    with torch.no_grad():  # the learned in-context positions feed only the in-context path
        model.in_context_pos.add_(torch.randn_like(model.in_context_pos))
    h1: dict[int, torch.Tensor] = {0: torch.empty(0), 2: torch.empty(0)}
    out1 = model(z, t, y, hidden_out=h1)
    assert torch.equal(h1[0], h0[0])  # block 0 runs before the tokens are inserted
    assert not torch.allclose(out1, out0, atol=1e-4)


def test_in_context_len_zero_has_no_tokens() -> None:
    model = build_model("JiT-Micro", in_context_len=0)
    assert model.in_context_pos is None and model.rope_in_context is None
    assert count_params(model) == count_params("JiT-Micro") - 4 * 64


# --------------------------------------------------------------------------- hidden_out


def test_hidden_out_is_the_patch_state_feeding_the_final_layer() -> None:
    model = _randomize(build_model("JiT-Micro")).eval()
    cfg = model.config
    z, t, y = _inputs(cfg)
    plain = model(z, t, y)
    last = cfg.depth - 1
    hidden: dict[int, torch.Tensor] = dict.fromkeys([0, last])  # type: ignore[arg-type]
    out = model(z, t, y, hidden_out=hidden)
    assert torch.equal(out, plain)
    assert set(hidden) == {0, last}
    for h in hidden.values():
        assert h.shape == (2, cfg.num_patches, cfg.hidden_size)
    c = model.t_embedder(t) + model.cond_embedder(y)
    torch.testing.assert_close(model.unpatchify(model.final_layer(hidden[last], c)), out)


def test_forward_traces_without_graph_breaks() -> None:
    torch._dynamo.reset()
    model = _randomize(build_model("JiT-Micro")).eval()
    z, t, y = _inputs(model.config)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    hidden: dict[int, torch.Tensor] = {1: torch.empty(0)}
    torch.testing.assert_close(compiled(z, t, y, hidden_out=hidden), model(z, t, y))
    assert hidden[1].shape == (2, 16, 64)


# --------------------------------------------------------------------------- conditioning seam


def test_condition_encoder_can_be_replaced() -> None:
    cfg = model_config("JiT-Micro")
    text_encoder = nn.Linear(8, cfg.hidden_size)  # e.g. a pooled text embedding -> [B, D]
    before = text_encoder.weight.clone()
    model = JiT(cfg, cond_embedder=text_encoder)
    assert torch.equal(text_encoder.weight, before)  # JiT's init leaves it alone
    _randomize(model)
    z, t, _ = _inputs(cfg)
    out_a = model(z, t, torch.randn(2, 8))
    out_b = model(z, t, torch.randn(2, 8))
    assert out_a.shape == z.shape and not torch.allclose(out_a, out_b)


# --------------------------------------------------------------------------- dropout


def test_dropout_only_in_the_middle_half() -> None:
    model = build_model("JiT-Micro", depth=8, dropout=0.2)
    rates = [(b.attn.drop.p, b.mlp.drop.p) for b in model.blocks]
    assert rates == [(0.0, 0.0)] * 2 + [(0.2, 0.2)] * 4 + [(0.0, 0.0)] * 2
    _randomize(model).train()
    z, t, y = _inputs(model.config)
    assert not torch.equal(model(z, t, y), model(z, t, y))
    model.eval()
    assert torch.equal(model(z, t, y), model(z, t, y))


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(image_size=30), "image_size=30"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(in_context_start=5), "in_context_start=5"),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(hidden_size=72, num_heads=4), "head_dim=18"),
        (dict(bottleneck=0), "bottleneck=0"),
    ],
)
def test_bad_config_names_the_value(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model_config("JiT-Micro", **fields)


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"JiT-X/16.*JiT-B/16.*JiT-Micro"):
        build_model("JiT-X/16")
    with pytest.raises(TypeError, match="widht"):
        model_config("JiT-Micro", widht=3)


# --------------------------------------------------------------------------- registry, cost


@pytest.mark.parametrize(("name", "target_m"), PARAM_TARGETS_M.items())
def test_paper_parameter_counts(name: str, target_m: float) -> None:
    assert count_params(name) / 1e6 == pytest.approx(target_m, rel=3e-3)


@pytest.mark.parametrize(("size", "d", "bottleneck"), [("B", 768, 128), ("L", 1024, 128), ("H", 1280, 256), ("G", 1664, 256)])  # fmt: skip
def test_patch_32_differs_from_16_only_in_patch_layers(size: str, d: int, bottleneck: int) -> None:
    extra_patch_dim = 3 * (32**2 - 16**2)  # in bottleneck weight and output linear (w + b)
    delta = count_params(f"JiT-{size}/32") - count_params(f"JiT-{size}/16")
    assert delta == extra_patch_dim * (bottleneck + d + 1)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_every_preset_counts_on_meta(name: str) -> None:
    """The meta-device count equals real CPU modules' parameters: a one-block network plus
    (depth − 1) real blocks (so even JiT-G is checked without building it)."""
    from dataclasses import replace

    from denoiselab.models.flops import with_placeholder_text
    from denoiselab.models.registry import build_network, model_config

    cfg = with_placeholder_text(model_config(name))  # text presets: counted sizes of info
    n = count_params(name)  # built on the meta device
    one = replace(cfg, depth=1, in_context_start=min(cfg.in_context_start, 1))
    real_one = sum(p.numel() for p in build_network(one, load_encoder=False).parameters())
    block_type = build_network(one, load_encoder=False).block_type  # JiTBlock or TextJiTBlock
    real_block = sum(p.numel() for p in block_type(cfg, 0.0).parameters())
    assert real_block > 0 and n == real_one + (cfg.depth - 1) * real_block
    if name.startswith("JLT-B"):  # B-width trunk, no bottleneck or in-context tokens
        assert 125e6 < n < 135e6


@pytest.mark.parametrize("name", ["JiT-T/4", "JiT-S/4", "JiT-Micro"])
def test_tiny_presets_build_and_run(name: str) -> None:
    model = build_model(name)
    z, t, y = _inputs(model.config)
    assert model(z, t, y).shape == z.shape
    assert count_params(model) == count_params(name)


def test_image_size_override_keeps_patch_and_grows_sequence() -> None:
    cfg = model_config("JiT-B/16", image_size=512)
    assert (cfg.patch_size, cfg.num_patches) == (16, 1024)
    assert count_params(cfg) == count_params("JiT-B/16")  # RoPE / sin-cos tables are buffers
    assert forward_macs(cfg)["gmacs"] > 4 * forward_macs("JiT-B/16")["gmacs"]


def test_b16_cost_is_about_25_gmacs_and_describe_reports_it() -> None:
    macs = forward_macs("JiT-B/16")
    assert 24.0 < macs["gmacs"] < 26.5  # paper Table 5: "25 Gflops" (counted as MACs)
    assert macs["gflops"] == pytest.approx(2 * macs["gmacs"])
    text = describe("JiT-B/16")
    assert "params: 131.1M" in text
    assert f"forward: {macs['gmacs']:.2f} GMACs / {macs['gflops']:.2f} GFLOPs per image" in text
    assert "tokens: 1024" in describe("JiT-B/16", image_size=512)


@pytest.mark.parametrize("name", ["JiT-Micro", "JiT-T/4"])
def test_analytic_macs_match_torch_flop_counter(name: str) -> None:
    model = build_model(name)
    cfg = model.config
    z, t, y = _inputs(cfg, batch=1)
    with FlopCounterMode(display=False) as counter:
        model(z, t, y)
    dense_ops = {"mm", "addmm", "bmm", "convolution"}  # SDPA is not counted on every backend
    flops = sum(
        v for op, v in counter.get_flop_counts()["Global"].items() if op.__name__ in dense_ops
    )
    macs = forward_macs(cfg)
    assert flops / 2 == macs["total"] - macs["attention"]
    tokens = [cfg.num_patches + (cfg.in_context_len if i >= cfg.in_context_start else 0) for i in range(cfg.depth)]  # fmt: skip
    assert macs["attention"] == sum(2 * n * n * cfg.hidden_size for n in tokens)


# --------------------------------------------------------------------------- training signal


def test_gradients_reach_every_parameter_after_leaving_zero_init() -> None:
    torch.manual_seed(0)
    model = build_model("JiT-Micro")
    z, t, y = _inputs(model.config, batch=12)  # y covers all 10 classes and the null class
    target = torch.randn_like(z)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> set[str]:
        opt.zero_grad()
        (model(z, t, y) - target).pow(2).mean().backward()
        live = {
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        opt.step()
        return live

    # adaLN-Zero: at init only the output linear gets a gradient ...
    assert step() == {"final_layer.linear.weight", "final_layer.linear.bias"}
    # ... then the residual stream and the gates; attention/MLP weights wait for non-zero gates.
    second = step()
    assert "blocks.0.ada.linear.weight" in second and "blocks.0.attn.qkv.weight" not in second
    assert step() == {n for n, _ in model.named_parameters()}


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = build_model("JiT-Micro")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1  # clean images in [-1, 1]
    t = torch.full((4,), 0.5)
    z_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * torch.randn(x.shape, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = (model(z_t, t, y) - x).pow(2).mean()  # x-prediction, x-loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


# --------------------------------------------------------------------------- toy MLP


def test_toy_mlp_shape_and_depth() -> None:
    net = ToyMLP(dim=512, hidden=256, depth=5)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5 and [m.out_features for m in linears] == [256] * 4 + [512]
    z, t = torch.randn(3, 512), torch.rand(3)
    out = net(z, t)
    assert out.shape == (3, 512)
    assert not torch.allclose(out, net(z, 1 - t))  # t is an input
    with pytest.raises(ValueError, match="depth=1"):
        ToyMLP(dim=2, depth=1)
