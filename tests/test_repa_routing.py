"""REPA with token routing: on a routed block the alignment runs over the tokens that went
through it (a per-sample sum written out here with a fixed route), on the other blocks over
all of them; iREPA on a routed block is refused when the run is built; the real loop trains
TREAD + REPA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from denoiselab.algorithms import build_terms, parse_terms
from denoiselab.algorithms.irepa import IREPA, IREPAConfig, RoutedAlignmentError
from denoiselab.algorithms.repa import REPA, REPAConfig
from denoiselab.models import build_model
from denoiselab.models.routing import RouteSampler
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

from .test_repa import TINY_SSL, PoolTeacher, _term_ctx
from .test_train import tiny

# route of a 4×4 grid, 8 of 16 tokens kept per sample (ascending, different per sample)
ROUTE = torch.tensor([
    [0, 2, 3, 6, 9, 10, 13, 15],
    [1, 4, 5, 7, 8, 11, 12, 14],
    [0, 1, 2, 3, 4, 5, 6, 7],
    [3, 5, 7, 9, 11, 12, 14, 15],
])  # fmt: skip


def _routed_net(kind: str = "tread"):
    """JiT-Micro 4 deep: block indices 1-2 routed (ratio 0.5 → K = 8 of 16), off its init."""
    routing = {"kind": kind, "ratio": 0.5, "start": 1, "end": 2}
    net = build_model("JiT-Micro", image_size=16, depth=4, in_context_start=2, routing=routing)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _routed_step(net, block: int):
    """REPA (λ 0.5, ``block``) on one step with the fixed ROUTE; returns the term's value,
    the block's hidden state from the same routed forward, the term and the step inputs."""
    mc = net.config
    teacher = PoolTeacher()
    term = REPA(REPAConfig(weight=0.5, block=block), mc.hidden_size, mc.grid_size, teacher,
                teacher.grid, teacher.dim)  # fmt: skip
    objective = DenoisingObjective(
        ObjectiveConfig(noise_scale=1.0), 10, [term], routes=RouteSampler.for_model(mc)
    )
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 10, (4,), generator=g)
    t, eps, y = objective.draw(x, y, g)
    out = objective.terms(net, x, y, t, eps, route=ROUTE)
    hidden = {block - 1: None}
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
    net(z, t, y, hidden_out=hidden, route=ROUTE)
    return out["repa"], hidden[block - 1].detach(), term, x


def _reference(term, h, x, rows):
    """−λ·mean over ``rows[b]`` of cos(h_φ(h_n), y_n), per sample, in float64 (own projector
    and teacher arithmetic)."""
    lin = [m for m in term.projector if isinstance(m, nn.Linear)]
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731
    p = lin[2](silu(lin[1](silu(lin[0](h.float()))))).double()
    u = ((x + 1) / 2 - 0.5) / 0.5
    pooled = u.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))  # [B, 3, 4, 4]
    teacher_y = term.teacher.map(pooled.flatten(2).transpose(1, 2)).double()
    expected = torch.zeros(len(rows), dtype=torch.float64)
    for b, kept in enumerate(rows):
        for n in kept:
            a, c = p[b, n], teacher_y[b, n]
            expected[b] += (a @ c) / (a.norm() * c.norm())
        expected[b] /= len(kept)
    return -0.5 * expected


@pytest.mark.parametrize("kind", ["tread", "sprint"])
def test_repa_on_a_routed_block_sums_over_the_tokens_that_went_through(kind):
    value, h, term, x = _routed_step(_routed_net(kind), block=2)  # block index 1: routed
    expected = _reference(term, h, x, ROUTE.tolist())
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    # and the rows that skipped the block (they carry block 0's output) would change it
    everything = _reference(term, h, x, [range(16)] * 4)
    assert (everything - expected).abs().min() > 1e-4


@pytest.mark.parametrize("block", [1, 4])  # block indices 0 and 3: outside the routed range
def test_repa_outside_the_routed_range_uses_every_token(block):
    value, h, term, x = _routed_step(_routed_net(), block=block)
    expected = _reference(term, h, x, [range(16)] * 4)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_irepa_on_a_routed_block_is_refused_when_the_run_is_built():
    routing = {"kind": "tread", "ratio": 0.5, "start": 1, "end": 2}
    mc = build_model("JiT-Micro", image_size=16, depth=4, routing=routing).config
    ctx = _term_ctx(mc)
    for block in (2, 3):  # block indices 1, 2: routed
        with pytest.raises(RoutedAlignmentError, match=rf"terms\.irepa\.block={block} aligns"):
            build_terms(parse_terms({"irepa": {"block": block}}), ctx)
    for block in (1, 4):  # all tokens go through block indices 0 and 3
        IREPA.check_routing(block, mc, "terms.irepa")
    dense = build_model("JiT-Micro", image_size=16, depth=4).config
    IREPA.check_routing(2, dense, "terms.irepa")
    with pytest.raises(RoutedAlignmentError, match="3×3 conv projector needs the whole"):
        from denoiselab.algorithms.repa import describe_alignment

        describe_alignment(IREPA, IREPAConfig(block=2), mc, "terms.irepa")


@pytest.mark.slow
def test_tread_with_repa_trains_through_the_loop(tmp_path):
    """TREAD over block indices 1-2 of a 4-deep JiT-Micro with REPA at block 2 (routed), the
    offline teacher trained into a temporary cache: the loop runs and logs the REPA term."""
    repa = {"weight": 0.5, "block": 2,
            "teacher": {"offline": TINY_SSL, "cache_dir": str(tmp_path / "cache")}}  # fmt: skip
    cfg = tiny(**{"model.depth": 4, "model.in_context_start": 2, "duration_nimg": 32})
    from dataclasses import replace

    model = {**cfg.model, "routing": {"kind": "tread", "ratio": 0.5, "start": 1, "end": 2}}
    cfg = replace(cfg, model=model, terms=parse_terms({"repa": repa}))
    run = train(cfg, tmp_path / "run", quiet=True)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4 and all(-0.5 <= r["loss/repa"] <= 0.5 for r in rows)
