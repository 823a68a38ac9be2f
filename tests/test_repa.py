"""REPA / iREPA as loss terms: the loss against its written-out formula, where gradients go,
the λ schedules, named errors, and the real training loop (exact resume, logs, λ = 0).

The teacher here is a small deterministic encoder of the real interface (a fixed linear map
of average-pooled pixel patches) unless the test is about the offline teacher, which then
trains with a reduced recipe into a temporary cache.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from denoiselab.algorithms import TermContext, build_terms, parse_terms
from denoiselab.algorithms.irepa import IREPA, IREPAConfig, spatial_norm
from denoiselab.algorithms.repa import REPA, GridError, REPAConfig, match_grid
from denoiselab.config import ConfigError
from denoiselab.encoders.base import ImageEncoder
from denoiselab.models import JiT, model_config
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.distributed import end_process
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

from .test_train import tiny

TINY_SSL = {"patch": 4, "steps": 3, "num_train": 48, "num_val": 16, "batch": 8, "width": 16, "depth": 1,
            "heads": 2, "head_dim": 8}  # fmt: skip


class PoolTeacher(ImageEncoder):
    """Average-pool ``patch × patch`` pixel blocks, then a fixed linear map to ``dim``."""

    kind, name, weights_id = "test", "pool", "pool"

    def __init__(self, resolution: int = 16, patch: int = 4, dim: int = 6) -> None:
        super().__init__((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.resolution, self.patch_size, self.dim = resolution, patch, dim
        self.map = nn.Linear(3, dim)
        self.calls = 0
        self.freeze()

    def tokens(self, pixel_values):
        self.calls += 1
        pooled = nn.functional.avg_pool2d(pixel_values, self.patch_size)
        return self.map(pooled.flatten(2).transpose(1, 2))


def _ctx_and_net(block: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    mc = model_config("JiT-Micro", image_size=16)
    net = JiT(mc)
    for p in net.parameters():  # off the adaLN-Zero init, so every block passes gradients
        p.data.add_(0.05 * torch.randn_like(p))
    return mc, net


def _repa(mc, cls=REPA, cfg=None, teacher=None):
    cfg = cfg or REPAConfig(weight=0.5, block=1)
    teacher = teacher or PoolTeacher()
    return cls(cfg, mc.hidden_size, mc.grid_size, teacher, teacher.grid, teacher.dim)


def _evaluate(net, term, nimg=0, x=None):
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10, extra_terms=[term])
    g = torch.Generator().manual_seed(1)
    x = x if x is not None else torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 10, (4,), generator=g)
    t, eps, y = objective.draw(x, y, g)
    return objective.terms(net, x, y, t, eps, nimg=nimg), (x, y, t, eps, objective)


def test_repa_loss_equals_the_written_out_formula():
    mc, net = _ctx_and_net()
    term = _repa(mc)
    out, (x, y, t, eps, _) = _evaluate(net, term)
    # independent: hidden tokens after block 1, projector by hand, cosine in float64
    hidden = {0: None}
    net(t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps, t, y, hidden_out=hidden)
    h = hidden[0].double()
    lin = [m for m in term.projector if isinstance(m, nn.Linear)]
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731
    p = lin[2](silu(lin[1](silu(lin[0](h.float()))))).double()
    u = ((x + 1) / 2 - 0.5) / 0.5  # the teacher's own preprocessing, resolution unchanged
    pooled = u.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))  # [B, 3, 4, 4]
    teacher_y = term.teacher.map(pooled.flatten(2).transpose(1, 2)).double()
    expected = torch.zeros(4, dtype=torch.float64)
    for b in range(4):
        for n in range(16):
            a, c = p[b, n], teacher_y[b, n]
            expected[b] += (a @ c) / (a.norm() * c.norm())
    expected = -0.5 * expected / 16
    torch.testing.assert_close(out["repa"].double(), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_projector_and_blocks_up_to_k_never_the_teacher():
    mc, net = _ctx_and_net()
    teacher = PoolTeacher()
    teacher.map.weight.requires_grad_(True)  # even a teacher that could learn must not
    term = _repa(mc, teacher=teacher)
    out, _ = _evaluate(net, term)
    out["repa"].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.blocks[0].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.blocks[1].parameters())
    assert all(p.grad is None for p in net.final_layer.parameters())
    assert teacher.map.weight.grad is None
    assert not any("teacher" in k or "map" in k for k in term.state_dict())  # never saved
    term.train()
    assert not teacher.training  # a teacher stays in eval mode


def test_block_two_aligns_patch_tokens_after_the_in_context_tokens_are_added():
    mc, net = _ctx_and_net()
    term = _repa(mc, cfg=REPAConfig(block=2))
    out, _ = _evaluate(net, term)
    out["repa"].mean().backward()
    assert term.hidden_blocks == (1,) and out["repa"].shape == (4,)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.blocks[1].parameters())


def test_irepa_spatial_norms_match_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    ref, prx = np.zeros((2, 5, 3)), np.zeros((2, 5, 3))
    xn = x.numpy()
    for b in range(2):
        for d in range(3):
            col = xn[b, :, d] - 0.7 * xn[b, :, d].mean()
            ref[b, :, d] = col / (col.std(ddof=1) + 1e-6)
            gam = xn[b].mean(axis=1)  # per-token channel mean
            col = xn[b, :, d] - gam * xn[b, :, d].mean()
            prx[b, :, d] = col / (col.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(spatial_norm(x, "reference", 0.7).numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(spatial_norm(x, "prx_per_token_gamma").numpy(), prx, rtol=1e-10)
    assert torch.equal(spatial_norm(x, "none"), x)


def test_irepa_uses_a_3x3_conv_on_the_grid_and_normalised_targets():
    mc, net = _ctx_and_net()
    term = _repa(mc, IREPA, IREPAConfig(weight=0.5, block=1))
    out, (x, y, t, eps, _) = _evaluate(net, term)
    assert isinstance(term.projector, nn.Conv2d) and term.projector.kernel_size == (3, 3)
    hidden = {0: None}
    net(t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps, t, y, hidden_out=hidden)
    h = hidden[0].transpose(1, 2).reshape(4, mc.hidden_size, 4, 4)
    p = nn.functional.conv2d(h, term.projector.weight, term.projector.bias, padding=1)
    p = p.flatten(2).transpose(1, 2)
    target = spatial_norm(term.teacher(x), "reference")
    cos = nn.functional.cosine_similarity(p, target, dim=-1, eps=0).mean(1)
    torch.testing.assert_close(out["irepa"], -0.5 * cos, rtol=1e-5, atol=1e-6)


def test_match_grid_keeps_affine_features_in_the_interior():
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    feats = torch.stack([2 * i + 1, -j, torch.ones_like(i)], -1).reshape(1, 64, 3)
    out = match_grid(feats, (8, 8), (4, 4)).reshape(4, 4, 3)
    # target cell (a, b) covers source cells 2a, 2a+1: its centre is at source 2a + 0.5
    for a in (1, 2):
        for b in (1, 2):
            torch.testing.assert_close(out[a, b], torch.tensor([2 * (2 * a + 0.5) + 1,
                                                                -(2 * b + 0.5), 1.0]))  # fmt: skip
    assert match_grid(feats, (8, 8), (8, 8)) is feats


def test_lambda_schedules():
    const = REPAConfig(weight=0.5)
    stop = REPAConfig(weight=0.5, schedule="stop", until_nimg=100)
    lin = REPAConfig(weight=0.5, schedule="linear", until_nimg=100, decay_nimg=40)
    assert [const.weight_at(n) for n in (0, 10**9)] == [0.5, 0.5]
    assert [stop.weight_at(n) for n in (0, 99, 100, 500)] == [0.5, 0.5, 0.0, 0.0]
    assert [lin.weight_at(n) for n in (0, 60, 70, 90, 100, 200)] == pytest.approx(
        [0.5, 0.5, 0.375, 0.125, 0.0, 0.0]
    )
    with pytest.raises(ConfigError, match="needs until_nimg"):
        REPAConfig(schedule="stop")
    with pytest.raises(ConfigError, match="0 < decay_nimg <= until_nimg"):
        REPAConfig(schedule="linear", until_nimg=10, decay_nimg=20)
    # until_nimg: 0 (no REPA from the start) was ignored under the constant schedule: λ stayed
    for bad in ({"until_nimg": 0}, {"decay_nimg": 0}):
        with pytest.raises(ConfigError, match="need schedule 'stop' or 'linear'"):
            REPAConfig(**bad)


def test_zero_lambda_skips_the_teacher_but_gives_every_projector_parameter_a_zero_gradient():
    mc, net = _ctx_and_net()
    teacher = PoolTeacher()
    term = _repa(mc, cfg=REPAConfig(block=1, schedule="stop", until_nimg=8), teacher=teacher)
    out, _ = _evaluate(net, term, nimg=0)
    assert teacher.calls == 1
    out, _ = _evaluate(net, term, nimg=8)
    assert teacher.calls == 1 and torch.equal(out["repa"], torch.zeros(4))
    out["repa"].sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in term.projector.parameters())


def _term_ctx(mc, data=None):
    from denoiselab.data import DataConfig, build_dataset

    data = data or DataConfig(name="shapes", image_size=16, num_images=64)
    return TermContext(mc, ObjectiveConfig(), data, build_dataset(data), torch.device("cpu"))


def test_named_errors(tmp_path):
    mc = model_config("JiT-Micro", image_size=16)
    ctx = _term_ctx(mc)
    with pytest.raises(ConfigError, match=r"terms\.repa\.block=3 is past the network's depth 2"):
        build_terms(parse_terms({"repa": {"block": 3}}), ctx)
    missing = str(tmp_path / "no_such_dino")
    with pytest.raises(ConfigError, match=r"terms\.repa\.teacher\.path='.*no_such_dino' does not"):
        build_terms(parse_terms({"repa": {"teacher": {"kind": "dinov2", "path": missing}}}), ctx)
    with pytest.raises(ConfigError, match=r"terms\.irepa\.teacher\.path is not set"):
        build_terms(parse_terms({"irepa": {"teacher": {"kind": "clip"}}}), ctx)
    with pytest.raises(GridError, match="2×3 token grid cannot be matched to the student's 4×4"):
        REPA(REPAConfig(block=1), 64, 4, None, (2, 3), 8)
    with pytest.raises(GridError, match="have 12 tokens, not the 4×4"):
        match_grid(torch.zeros(1, 12, 3), (4, 4), (4, 4))
    with pytest.raises(ConfigError, match=r"unknown key 'wieght' in terms\.repa"):
        parse_terms({"repa": {"wieght": 1}})


def with_repa(tmp_path, **fields):
    repa = {"weight": 0.5, "block": 1, "teacher": {"offline": TINY_SSL, "cache_dir": str(tmp_path)}}
    return replace(tiny(), terms=parse_terms({"repa": {**repa, **fields}}))


@pytest.mark.slow
def test_repa_trains_through_the_loop_resumes_exactly_and_logs_lambda(tmp_path):
    cfg = with_repa(tmp_path / "cache", schedule="stop", until_nimg=40)
    full = train(cfg, tmp_path / "full", quiet=True)
    half = train(replace(cfg, duration_nimg=32), tmp_path / "half", quiet=True)
    resumed = train(cfg, tmp_path / "half", resume=half, quiet=True)
    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(resumed)
    assert any("projector" in k for k in a.objective)
    assert not any("teacher" in k or "net." in k for k in a.objective)
    assert all(torch.equal(a.objective[k], b.objective[k]) for k in a.objective)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    rows = [r for r in read_metrics(full / "metrics.jsonl") if "loss" in r]
    lam = {r["nimg"]: r["repa/lambda"] for r in rows}
    assert lam[32] == 0.5 and lam[48] == 0.0 and lam[64] == 0.0
    # the row at nimg covers the step that began at nimg − 8: λ = 0 from the step at 40 on
    assert all(r["loss/repa"] != 0 for r in rows if r["nimg"] <= 40)
    assert all(r["loss/repa"] == 0 for r in rows if r["nimg"] > 40)


def _ddp_worker(rank: int, port: int, out: str, cache: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    cfg = with_repa(cache, schedule="stop", until_nimg=32)
    try:
        train(replace(cfg, device="cpu"), out, quiet=True)
    finally:
        torch.distributed.destroy_process_group()
    end_process(0)  # a clean exit of a gloo process: see end_process's docstring


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_with_repa_equals_one_process_also_after_lambda_reaches_zero(tmp_path):
    """2 gloo ranks (the offline teacher is trained by rank 0 while rank 1 waits) == one
    process with grad_accum 2; λ drops to 0 mid-run, where the projector gets exact zero
    gradients instead of none (without them DDP would fail the next reduction)."""
    from .test_terms import _free_port

    cache = tmp_path / "cache"
    torch.multiprocessing.spawn(
        _ddp_worker, args=(_free_port(), str(tmp_path / "ddp"), str(cache)), nprocs=2, join=True
    )
    cfg = replace(with_repa(cache, schedule="stop", until_nimg=32), device="cpu")
    one = train(replace(cfg, grad_accum=2), tmp_path / "one", quiet=True)
    a, b = ckpt_io.load_checkpoint(tmp_path / "ddp"), ckpt_io.load_checkpoint(one)
    assert any("projector" in k for k in a.objective)
    for k in a.objective:
        torch.testing.assert_close(a.objective[k], b.objective[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["repa/lambda"] == 0.0 and rows[0]["loss/repa"] != 0


@pytest.mark.slow
def test_bench_times_training_with_and_without_repa_in_one_run(tmp_path, capsys):
    import json

    from denoiselab.bench.cli import bench_main

    ssl = ",".join(f"teacher.offline.{k}={v}" for k, v in TINY_SSL.items())
    spec = f"repa:block=1,{ssl},teacher.cache_dir={tmp_path / 'cache'}"
    args = ["--model", "JiT-Micro", "--batch", "8", "--what", "train", "--warmup", "1",
            "--repeats", "2", "--matmul-max-size", "64", "--dtype", "fp32", "--device", "cpu"]  # fmt: skip
    assert bench_main([*args, "--repa", spec, "irepa:wieght=1", "--out", str(tmp_path)]) == 2
    assert "--repa 'irepa:wieght=1': unknown key 'wieght' in terms.irepa" in capsys.readouterr().err
    assert bench_main([*args, "--repa", spec, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    base, repa = result["terms"]["rows"]
    assert base["term_params"] == 0 and repa["term_params"] > 0
    assert len(repa["steps_s"]) == 2 and repa["cost"] > 0 and base["images_per_s"] > 0
    assert "train img/s without terms" in capsys.readouterr().out


def test_info_counts_the_projector_parameters_of_a_config(capsys):

    from denoiselab.cli import main

    quickstart = "quickstart"  # a shipped config, by name
    assert main(["info", quickstart, "terms.repa.projector_dim=32"]) == 0
    out = capsys.readouterr().out
    d, h, t = 128, 32, 64  # quickstart width, projector width, offline teacher width
    mlp = d * h + h + h * h + h + h * t + t
    assert f"terms.repa: tokens after block 2/4 → offline teacher (64-d); projector {mlp:,}" in out
    assert main(["info", quickstart, "terms.irepa.block=4"]) == 0
    assert f"after block 4/4 → offline teacher (64-d); projector {9 * d * t + t:,}" in (
        capsys.readouterr().out
    )
