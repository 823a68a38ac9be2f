"""CUDA correctness: the GPU paths (bf16 autocast, flash SDPA, torch.compile, NCCL under
torchrun) against the fp32 reference path. Skipped, with the reason, where CUDA is absent —
CI has no GPU; these run on a lent H100/H200 (see BENCHMARKS.md for the command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from denoiselab.bench.workloads import bench_train_config
from denoiselab.models import build_model
from denoiselab.models.layers import Attention, AxialRoPE
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.sampling.generate import compile_for_sampling, generate, noise_for
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.loop import Trainer, train
from denoiselab.train.run import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BETA1 = 0.9


@pytest.fixture(autouse=True)
def _no_tf32():
    """Reference comparisons in true fp32: TF32 matmuls would be the error we measure."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    torch._dynamo.reset()


@torch.no_grad()
def _randomize(model: nn.Module, std: float = 0.05) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)
    return model


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def test_cuda_forward_matches_cpu_in_fp32() -> None:
    net = _randomize(build_model("JiT-Micro")).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    t, y = torch.rand(4, generator=g), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        ref = net(x, t, y)
        out = net.cuda()(x.cuda(), t.cuda(), y.cuda())
    assert out.device.type == "cuda"
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_fused_sdpa_kernels_match_math_attention(backend: str) -> None:
    """JiT-B/16's attention shape (768 wide, 12 heads of 64, 256 patches + 32 in-context
    tokens) with qk-norm and RoPE: the bf16 fused kernel against the fp32 math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = Attention(768, 12).cuda()
    rope = AxialRoPE(64, 16, num_prefix=32).cuda()
    x = torch.randn(2, 288, 768, device="cuda")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref = attn(x, rope)
    kernel = sdpa_kernel(getattr(SDPBackend, backend))
    with torch.no_grad(), kernel, torch.autocast("cuda", dtype=torch.bfloat16):
        fast = attn(x, rope)
    assert fast.dtype == torch.bfloat16
    assert _rel(fast, ref) < 2e-2
    assert _rel(attn(x.roll(1, dims=1), rope), ref) > 0.1  # what a real error looks like


def _trainer(tmp_path: Path, dtype: str, compile_: bool = False) -> Trainer:
    cfg = bench_train_config("JiT-Micro", None, 8, dtype, compile_, "cuda")
    trainer = Trainer(cfg, tmp_path / f"{dtype}-{compile_}", quiet=True)
    _randomize(trainer.model)
    return trainer


def _one_step(trainer: Trainer) -> tuple[float, Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (8,), generator=g)
    loss = trainer.train_step(0, images, labels)["denoise"].item()
    params = list(trainer.model.parameters())
    grads = torch.cat(
        [(trainer.optimizer.state[p]["exp_avg"] / (1 - BETA1)).flatten() for p in params]
    )
    return loss, grads


@pytest.mark.parametrize("dtype,compile_,loss_tol,grad_tol", [
    ("bf16", False, 5e-3, 2e-2),
    ("fp32", True, 1e-5, 1e-4),
    ("bf16", True, 5e-3, 2e-2),
])  # fmt: skip
def test_cuda_training_step_matches_fp32_eager(tmp_path, dtype, compile_, loss_tol, grad_tol):
    loss_f, grads_f = _one_step(_trainer(tmp_path, dtype, compile_))
    loss_r, grads_r = _one_step(_trainer(tmp_path, "fp32"))
    assert abs(loss_f - loss_r) <= loss_tol * loss_r
    assert grads_r.abs().sum() > 0
    assert _rel(grads_f, grads_r) < grad_tol


def _fsdp_trainer(tmp_path: Path, dtype: str, compile_: bool, ac: bool) -> Trainer:
    """FSDP on one GPU (a one-rank NCCL group), with the same randomised weights as
    :func:`_trainer` (one rank holds every parameter whole: its local slice)."""
    cfg = bench_train_config("JiT-Micro", None, 8, dtype, compile_, "cuda", strategy="fsdp",
                             activation_checkpointing=ac)  # fmt: skip
    trainer = Trainer(cfg, tmp_path / f"fsdp-{dtype}-{compile_}-{ac}", quiet=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.to_local().add_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
    return trainer


@pytest.mark.parametrize("compile_,ac", [(False, False), (True, True)])
def test_fsdp_bf16_training_step_matches_fp32_eager(tmp_path, compile_, ac):
    """FSDP: bf16 parameters in compute, fp32 master weights and gradient reduction;
    compiled per block, with activation checkpointing."""
    trainer = _fsdp_trainer(tmp_path, "bf16", compile_, ac)
    try:
        g = torch.Generator().manual_seed(1)
        images = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
        labels = torch.randint(0, 10, (8,), generator=g)
        loss_f = trainer.train_step(0, images, labels)["denoise"].item()
        params = list(trainer.model.parameters())
        assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights
        grads_f = torch.cat([(trainer.optimizer.state[p]["exp_avg"].full_tensor() / (1 - BETA1))
                             .flatten() for p in params])  # fmt: skip
    finally:
        trainer.close()
    loss_r, grads_r = _one_step(_trainer(tmp_path, "fp32"))
    assert abs(loss_f - loss_r) <= 5e-3 * loss_r
    assert _rel(grads_f, grads_r) < 2e-2


def test_cuda_fsdp_resume_from_sharded_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    cfg = replace(_tiny_cfg(), strategy="fsdp")
    straight = train(replace(cfg, duration_nimg=32), tmp_path / "a", quiet=True)
    train(replace(cfg, duration_nimg=16), tmp_path / "b", quiet=True)
    resumed = train(replace(cfg, duration_nimg=32), tmp_path / "b", resume=tmp_path / "b",
                    quiet=True)  # fmt: skip
    assert (tmp_path / "b" / "checkpoints" / "step_000000002.dcp").is_dir()
    a, b = ckpt_io.load_checkpoint(straight), ckpt_io.load_checkpoint(resumed)
    assert a.step == b.step == 4
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_training_step_never_synchronises_with_the_host(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "bf16")
    images, labels = torch.rand(8, 3, 16, 16, device="cuda"), torch.zeros(8, dtype=torch.long)
    trainer.train_step(0, images, labels)  # first step: lazy initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(1, images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_cuda_sampling_matches_cpu_eager(bf16: bool) -> None:
    net = _randomize(build_model("JiT-Micro")).eval()
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), num_classes=10)
    labels = torch.tensor([0, 3, 7, 9])
    noise = noise_for(0, 4, (3, 16, 16), 1.0, "cpu")
    kw = dict(null_class=10, steps=20, cfg_scale=2.0, interval=(0.1, 1.0))
    ref = generate(net, objective.velocity, labels, noise, **kw)
    fast_net = compile_for_sampling(net.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        fast = generate(fast_net, objective.cuda().velocity, labels.cuda(), noise.cuda(), **kw)
    assert fast.device.type == "cuda" and torch.isfinite(fast).all()
    assert _rel(fast, ref) < (1.5e-2 if bf16 else 1e-4)


def _tiny_cfg():
    from tests.test_train import tiny

    return replace(tiny(), device="cuda", precision="bf16")


def test_cuda_resume_is_bit_exact(tmp_path: Path) -> None:
    """Deterministic algorithms on CUDA (cuBLAS workspace set by the Trainer): N + N = 2N."""
    cfg = _tiny_cfg()
    straight = train(replace(cfg, duration_nimg=32), tmp_path / "a", quiet=True)
    train(replace(cfg, duration_nimg=16), tmp_path / "b", quiet=True)
    resumed = train(
        replace(cfg, duration_nimg=32), tmp_path / "b", resume=tmp_path / "b", quiet=True
    )
    losses = [
        [r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (straight, resumed)
    ]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    a, b = ckpt_io.load_checkpoint(straight), ckpt_io.load_checkpoint(resumed)
    assert a.step == b.step == 4
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_torchrun_nccl_trains_and_samples(tmp_path: Path) -> None:
    import yaml

    from tests.test_train import TINY

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "device": "cuda", "precision": "bf16"}))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           "-m", "denoiselab", "train", str(cfg), "--out", str(out), "--steps", "4"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt_io.load_checkpoint(out).step == 4
    assert json.loads((out / "meta.json").read_text())["device"] == "cuda:0"
