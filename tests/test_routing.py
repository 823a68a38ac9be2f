"""Token routing (TREAD, SPRINT): the routed network against a per-sample reference written
out here (own index bookkeeping, RoPE from ``apply_rope`` at each kept token's grid position),
hidden states under routing, the route drawn by the objective, FLOPs, bad input, and the
real training loop (bit-exact resume, DDP equality)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from denoiselab.config import ConfigError
from denoiselab.models import apply_rope, axial_rope_angles, build_model, forward_macs
from denoiselab.models.jit import JiT
from denoiselab.models.routing import RouteSampler, RoutingConfig, draw_route, gather_tokens
from denoiselab.objectives import DenoisingObjective, LossTerm, ObjectiveConfig, StepContext
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config, restore
from denoiselab.train.distributed import end_process
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

from .test_terms import _free_port
from .test_train import tiny


def _net(kind: str, ratio: float = 0.5, start: int = 1, end: int = 2, **fields) -> JiT:
    """JiT-Micro made 4 deep (dense block 0, routed 1-2, dense 3), weights off their init."""
    routing = {"kind": kind, "ratio": ratio, "start": start, "end": end}
    fields = {"depth": 4, "in_context_start": 2, **fields}
    net = build_model("JiT-Micro", routing=routing, **fields)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def _inputs(net: JiT, batch: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    cfg = net.config
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return (
        z,
        torch.rand(batch, generator=g),
        torch.randint(0, cfg.num_classes, (batch,), generator=g),
    )


def _rope(cfg, prefix: int, positions: Tensor):
    """RoPE of one sample whose sequence is ``prefix`` in-context tokens (no rotation) and
    patch tokens at grid ``positions`` (written with the reference ``apply_rope``)."""
    g = cfg.grid_size
    angles = axial_rope_angles(positions // g, positions % g, cfg.head_dim)
    angles = torch.cat([torch.zeros(prefix, cfg.head_dim // 2), angles])
    return lambda x: apply_rope(x, angles.cos(), angles.sin())


@torch.no_grad()
def _reference(net: JiT, z, t, y, keep: Tensor | None, hidden: dict | None = None) -> Tensor:
    """The routed forward, one sample at a time, with explicit index bookkeeping."""
    cfg, r = net.config, net.config.routing
    blocks = r.blocks(cfg.depth)
    n, L = cfg.num_patches, cfg.in_context_len
    outs = []
    for b in range(z.shape[0]):
        y_emb = net.cond_embedder(y[b : b + 1])
        c = net.t_embedder(t[b : b + 1]) + y_emb
        x = net.patch_embed(z[b : b + 1]) + net.pos_embed  # [1, N, D]
        prefix = 0
        kept = torch.arange(n) if keep is None else keep[b]
        for i, block in enumerate(net.blocks):
            if i == cfg.in_context_start:
                x = torch.cat([y_emb.unsqueeze(1) + net.in_context_pos, x], dim=1)
                prefix = L
            if i == blocks.start:
                dense = x[:, prefix:].clone()  # what enters the routed range
                x = torch.cat([x[:, :prefix], dense[:, kept]], dim=1)
            positions = kept if i in blocks else torch.arange(n)
            x = block(x, c, _rope(cfg, prefix, positions))
            if hidden is not None and i in hidden:
                rows = x[:, prefix:]
                if i in blocks and keep is not None:
                    full = dense.clone()
                    full[:, kept] = rows
                    rows = full
                hidden[i] = rows if b == 0 else torch.cat([hidden[i], rows])
            if i == blocks.stop - 1:
                if r.kind == "tread":
                    deep = dense.clone()  # skipped tokens rejoin with the value they entered
                else:
                    deep = net.router.mask_token.expand(1, n, -1).clone()
                deep[:, kept] = x[:, prefix:]
                if r.kind == "sprint":
                    deep = net.router.fuse(torch.cat([dense, deep], dim=-1))
                x = torch.cat([x[:, :prefix], deep], dim=1)
        outs.append(net.unpatchify(net.final_layer(x[:, prefix:], c)))
    return torch.cat(outs)


@pytest.mark.parametrize("kind", ["tread", "sprint"])
@pytest.mark.parametrize("in_context_start", [0, 2])  # class tokens before / inside the range
def test_routed_forward_matches_a_per_sample_reference(kind: str, in_context_start: int) -> None:
    net = _net(kind, in_context_start=in_context_start)
    z, t, y = _inputs(net)
    keep = draw_route(net.config.routing, 3, 16, torch.Generator().manual_seed(2))
    assert keep.shape == (3, 8)
    out = net(z, t, y, route=keep)
    torch.testing.assert_close(out, _reference(net, z, t, y, keep), rtol=1e-5, atol=1e-6)
    # sensitive: the full network differs, and so does the same route on other tokens
    assert (out - net(z, t, y)).abs().max() > 1e-3
    assert (out - net(z, t, y, route=keep.flip(0))).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("in_context_start", "tokens"),
    [(0, [4 + 16, 4 + 8, 4 + 8, 4 + 16]), (2, [16, 8, 4 + 8, 4 + 16])],  # 4 class tokens
)
def test_routed_blocks_see_the_class_tokens_and_the_kept_tokens(in_context_start, tokens):
    net = _net("tread", in_context_start=in_context_start)
    seen = {}
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].shape[1]))
    z, t, y = _inputs(net)
    net(z, t, y, route=draw_route(net.config.routing, 3, 16))
    assert [seen[i] for i in range(4)] == tokens


@pytest.mark.parametrize("kind", ["tread", "sprint"])
def test_without_a_route_the_full_network_runs(kind: str) -> None:
    """Sampling: no route; TREAD is then the plain network, SPRINT still fuses its paths."""
    net = _net(kind)
    z, t, y = _inputs(net)
    torch.testing.assert_close(net(z, t, y), _reference(net, z, t, y, None), rtol=1e-5, atol=1e-6)
    if kind == "tread":
        plain = build_model("JiT-Micro", depth=4, in_context_start=2)
        plain.load_state_dict(net.state_dict())
        assert torch.equal(plain.eval()(z, t, y), net(z, t, y))


def test_tread_keeping_every_token_equals_the_dense_network() -> None:
    net = _net("tread", ratio=0.0)
    z, t, y = _inputs(net)
    keep = draw_route(net.config.routing, 3, 16)
    assert torch.equal(keep, torch.arange(16).expand(3, -1))
    torch.testing.assert_close(net(z, t, y, route=keep), net(z, t, y), rtol=0, atol=1e-6)


def test_a_route_on_a_dense_network_is_an_error() -> None:
    net = build_model("JiT-Micro")
    z, t, y = _inputs(net)
    with pytest.raises(ValueError, match="without routing"):
        net(z, t, y, route=torch.zeros(3, 4, dtype=torch.long))


@pytest.mark.parametrize("kind", ["tread", "sprint"])
def test_hidden_states_of_routed_blocks(kind: str) -> None:
    """``hidden_out[k]`` is [B, N, D]; for a routed block the skipped rows hold the value they
    entered the range with, and ``StepContext.tokens_through`` names the rows that went through."""
    net = _net(kind, in_context_start=0)
    z, t, y = _inputs(net)
    keep = draw_route(net.config.routing, 3, 16, torch.Generator().manual_seed(3))
    hidden, ref = dict.fromkeys([0, 1, 2, 3]), dict.fromkeys([0, 1, 2, 3])
    net(z, t, y, route=keep, hidden_out=hidden)
    _reference(net, z, t, y, keep, ref)
    for k in hidden:
        assert hidden[k].shape == (3, 16, 64)
        torch.testing.assert_close(hidden[k], ref[k], rtol=1e-5, atol=1e-6)
    skipped = torch.ones(3, 16, dtype=torch.bool).scatter(1, keep, False)
    for k in (1, 2):  # routed: skipped rows = the state after block 0, exactly
        assert torch.equal(hidden[k][skipped], hidden[0][skipped])
        assert not torch.allclose(hidden[k][~skipped], hidden[0][~skipped])
    ctx = StepContext(*[None] * 9, route=keep, routed_blocks=range(1, 3))  # type: ignore[arg-type]
    assert ctx.tokens_through(0) is None and ctx.tokens_through(3) is None
    assert torch.equal(ctx.tokens_through(2), keep)
    went = gather_tokens(hidden[2], ctx.tokens_through(2))
    assert went.shape == (3, 8, 64) and torch.equal(went, hidden[2][~skipped].view(3, 8, 64))


def test_draw_route_is_a_uniform_seeded_subset() -> None:
    cfg = RoutingConfig(kind="tread", ratio=0.75)
    assert [cfg.num_kept(n) for n in (16, 10, 4, 1)] == [4, 2, 1, 1]  # N − min(round(¾N), N−1)
    a = draw_route(cfg, 4000, 16, torch.Generator().manual_seed(0))
    b = draw_route(cfg, 4000, 16, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4000, 4)
    assert (a.diff(dim=1) > 0).all()  # ascending, no repeats
    freq = torch.bincount(a.flatten(), minlength=16) / 4000
    torch.testing.assert_close(freq, torch.full((16,), 0.25), rtol=0, atol=0.03)


class _Probe(LossTerm):
    """Records what a term sees of the route."""

    name = "probe"
    hidden_blocks = (2,)

    def forward(self, ctx: StepContext) -> Tensor:
        self.ctx = ctx
        return torch.zeros_like(ctx.t)


def test_objective_draws_the_route_after_the_dense_draws() -> None:
    """Same generator seed: a dense objective and a routed one draw the same t, ε and labels;
    the route comes next from the same stream and reaches the network and the terms."""
    net = _net("tread", ratio=0.0)  # keeps every token: equal losses if t, ε, y are equal
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.randint(0, 10, (4,))
    routes = RouteSampler.for_model(net.config)
    probe = _Probe()
    routed = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10, [probe], routes=routes)
    dense = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10)
    a = routed(net, x, y, torch.Generator().manual_seed(5))["denoise"]
    b = dense(net, x, y, torch.Generator().manual_seed(5))["denoise"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert probe.ctx.routed_blocks == range(1, 3) and torch.equal(
        probe.ctx.route, torch.arange(16).expand(4, -1)
    )
    half = DenoisingObjective(
        ObjectiveConfig(noise_scale=1.0),
        10,
        [probe],
        routes=RouteSampler.for_model(_net("tread").config),
    )
    gen = torch.Generator().manual_seed(5)
    half(net, x, y, gen)
    again = torch.Generator().manual_seed(5)
    t, _, _ = half.draw(x, y, again)
    assert torch.equal(probe.ctx.t, t) and torch.equal(
        probe.ctx.route, draw_route(RoutingConfig("tread"), 4, 16, again)
    )


# --------------------------------------------------------------------------- cost


def test_routed_macs_have_the_closed_form_and_match_torch_counter() -> None:
    net = _net("sprint", ratio=0.75, in_context_start=2)
    cfg = net.config
    d, n, L, kept = 64, 16, 4, 4
    per_token = 4 * d * d + 3 * d * int(int(4 * d) * 2 / 3)
    tokens = [n, kept, kept + L, n + L]  # block 0 dense, 1-2 routed (class tokens from 2), 3 dense
    full, routed = forward_macs(cfg), forward_macs(cfg, routed=True)
    assert routed["block_linear"] == sum(tokens) * per_token
    assert routed["attention"] == sum(2 * m * m * d for m in tokens)
    assert routed["routing"] == full["routing"] == n * 2 * d * d
    assert full["block_linear"] == (n + n + n + L + n + L) * per_token
    assert routed["total"] - full["total"] == (sum(tokens) - (4 * n + 2 * L)) * per_token + (
        sum(2 * m * m * d for m in tokens) - sum(2 * m * m * d for m in (n, n, n + L, n + L))
    )
    z, t, y = _inputs(net, batch=1)
    with FlopCounterMode(display=False) as counter:
        net(z, t, y, route=draw_route(cfg.routing, 1, 16))
    dense_ops = {"mm", "addmm", "bmm", "convolution"}
    flops = sum(
        v for op, v in counter.get_flop_counts()["Global"].items() if op.__name__ in dense_ops
    )
    assert flops / 2 == routed["total"] - routed["attention"]


# --------------------------------------------------------------------------- bad input


def test_bad_routing_is_a_named_config_error_at_config_time() -> None:
    base = ["model.name=JiT-Micro", "model.routing.kind=tread"]
    with pytest.raises(
        ConfigError, match=r"start=2, end=5 give blocks 2 … 5, not a range inside the 2 blocks"
    ):
        load_train_config(None, [*base, "model.routing.end=5"])
    with pytest.raises(ConfigError, match=r"start=2, end=-4 give blocks 2 … -2"):
        load_train_config(None, base)  # PRX's default range does not fit 2 blocks
    with pytest.raises(ConfigError, match=r"model.routing.ratio=1.0 must lie in \[0, 1\)"):
        load_train_config(
            None, [*base, "model.routing.ratio=1.0", "model.routing.start=0", "model.routing.end=1"]
        )
    with pytest.raises(ConfigError, match=r"model.routing.ratio=-0.1"):
        load_train_config(None, [*base, "model.routing.ratio=-0.1"])
    with pytest.raises(ConfigError, match=r"model.routing.kind='treed' is not valid"):
        load_train_config(None, ["model.name=JiT-Micro", "model.routing.kind=treed"])
    with pytest.raises(ConfigError, match=r"unknown key 'ration' in model.routing"):
        load_train_config(None, [*base, "model.routing.ration=0.5"])
    with pytest.raises(ValueError, match=r"give blocks 3 … 3"):
        build_model("JiT-Micro", routing={"kind": "sprint", "start": 3, "end": 3})


# --------------------------------------------------------------------------- the real loop

ROUTED = {"model.depth": 3, "model.routing.start": 1, "model.routing.end": 1}


def routed(kind: str, **overrides):
    return tiny(**{**ROUTED, "model.routing.kind": kind, **overrides})


@pytest.mark.parametrize("kind", ["tread", "sprint"])
def test_routed_run_resumes_bit_exactly_and_samples_dense(tmp_path, kind) -> None:
    cfg = routed(kind)
    full = train(cfg, tmp_path / "full", quiet=True)
    half = train(replace(cfg, duration_nimg=32), tmp_path / "half", quiet=True)
    resumed = train(cfg, tmp_path / "half", resume=half, quiet=True)
    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(resumed)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    rows = [r["loss"] for r in read_metrics(full / "metrics.jsonl")]
    assert rows == [r["loss"] for r in read_metrics(resumed / "metrics.jsonl")]
    dense = ckpt_io.load_checkpoint(
        train(tiny(**{"model.depth": 3}), tmp_path / "dense", quiet=True)
    )
    assert any(not torch.equal(a.model[k], dense.model[k]) for k in dense.model)
    if kind == "sprint":
        assert {"router.fuse.weight", "router.mask_token"} <= set(a.model)
    r = restore(full)
    assert r.objective.routes is None and r.model_cfg.routing.kind == kind
    images = r.sample(torch.arange(2), 0, steps=2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        train(routed("sprint", device="cpu", duration_nimg=32), out, quiet=True)
    finally:
        torch.distributed.destroy_process_group()
    end_process(0)  # a clean exit of a gloo process: see end_process's docstring


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_with_routing_equals_one_process_with_accumulation(tmp_path) -> None:
    """Each rank draws its routes from its shard's generator, as micro-batch k of one process
    does: two gloo ranks equal ``grad_accum = 2``."""
    torch.multiprocessing.spawn(
        _ddp_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=2, join=True
    )
    one = train(routed("sprint", device="cpu", duration_nimg=32, grad_accum=2), tmp_path / "one",
                quiet=True)  # fmt: skip
    a, b = ckpt_io.load_checkpoint(tmp_path / "ddp"), ckpt_io.load_checkpoint(one)
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    # sensitive: one micro-batch (other routes and noise per sample) gives other weights
    other = ckpt_io.load_checkpoint(
        train(routed("sprint", device="cpu", duration_nimg=32), tmp_path / "other", quiet=True)
    )
    assert max((a.model[k] - other.model[k]).abs().max().item() for k in a.model) > 1e-5


def test_routing_stops_for_the_full_token_stage(tmp_path) -> None:
    """``objective.routing_until``: routed until that fraction of the run, then dense (SPRINT's
    full-token fine-tuning), decided by the images seen, so resume and DDP agree on it."""
    from denoiselab.algorithms import TermContext
    from denoiselab.data import build_dataset
    from denoiselab.train.build import build_objective, resolve_model_config

    cfg = routed("sprint", **{"objective.routing_until": 0.75}).resolved()  # routed below 48 of 64
    data = build_dataset(cfg.data)
    mc = resolve_model_config(cfg, image_size=16, channels=3, num_classes=data.num_classes)
    ctx = TermContext(mc, cfg.objective, cfg.data, data, "cpu")
    objective = build_objective(cfg, mc, ctx)
    assert objective.routes_until_nimg == 48
    probe = _Probe()
    objective.extra_terms.append(probe)
    net = JiT(mc)
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.arange(4)
    objective(net, x, y, torch.Generator().manual_seed(0), nimg=40)
    assert probe.ctx.route is not None and probe.ctx.tokens_through(1) is not None
    objective(net, x, y, torch.Generator().manual_seed(0), nimg=48)
    assert probe.ctx.route is None and probe.ctx.tokens_through(1) is None
    with pytest.raises(ConfigError, match=r"objective.routing_until=0.0 must lie in \(0, 1\]"):
        load_train_config(None, ["model.name=JiT-Micro", "objective.routing_until=0"])


def test_routing_until_on_a_network_without_routing_is_a_named_error() -> None:
    # the full-token stage needs a routed stage before it; without model.routing the key
    # changed nothing (the run trained dense throughout, as if it were absent)
    with pytest.raises(ConfigError, match=r"objective.routing_until=0.9 .*model.routing"):
        load_train_config(None, ["model.name=JiT-Micro", "objective.routing_until=0.9"])
    cfg = load_train_config(
        None,
        [
            "model.name=JiT-Micro",
            "model.routing.kind=tread",
            "model.routing.start=0",
            "model.routing.end=1",
            "objective.routing_until=0.9",
        ],
    )
    assert cfg.objective.routing_until == 0.9
