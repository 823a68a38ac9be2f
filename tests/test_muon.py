"""denoiselab's Muon: equal to ``torch.optim.Muon`` bit for bit with its bf16 iteration, equal to
a float64 reference written out here with the fp32 one, the ``auto`` dtype rule, state dicts
shared with torch's, and DDP through the real loop."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from denoiselab.config import ConfigError
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config
from denoiselab.train.distributed import end_process
from denoiselab.train.loop import train
from denoiselab.train.muon import Muon, native_bf16, resolve_ns_dtype
from denoiselab.train.optim import build_optimizer, has_muon

from .test_optim import _module
from .test_terms import _free_port
from .test_train import tiny

SHAPES = [(24, 8), (8, 24), (16, 16)]  # tall (iterated transposed), wide, square


def _params_and_grads(seed: int, steps: int = 3):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    return params, grads


def _run(opt_cls, params, grads, **kwargs) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ps, **kwargs)
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


@pytest.mark.skipif(not has_muon(), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_bf16_iteration_equals_torch_muon_bit_for_bit(nesterov: bool, adjust: str) -> None:
    params, grads = _params_and_grads(0)
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    ours = _run(Muon, params, grads, ns_dtype=torch.bfloat16, **kw)
    theirs = _run(torch.optim.Muon, params, grads, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    fp32 = _run(Muon, params, grads, ns_dtype=torch.float32, **kw)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(fp32, theirs))  # the dtype matters


def _reference(params, grads, lr, wd, mu, nesterov, adjust) -> list[torch.Tensor]:
    """Muon in float64, written from the algorithm (docstring of train/muon.py)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    out = []
    for i, p0 in enumerate(params):
        theta, buf = p0.double(), torch.zeros_like(p0, dtype=torch.float64)
        rows, cols = p0.shape
        scale = math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))  # fmt: skip
        for step in grads:
            g = step[i].double()
            buf = mu * buf + (1 - mu) * g
            u = (1 - mu) * g + mu * buf if nesterov else buf
            x = u.T if rows > cols else u
            x = x / x.norm()
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            o = x.T if rows > cols else x
            theta = theta * (1 - lr * wd) - lr * scale * o
        out.append(theta)
    return out


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_fp32_iteration_equals_a_float64_reference(nesterov: bool, adjust: str) -> None:
    params, grads = _params_and_grads(1)
    kw = dict(lr=0.05, wd=0.1, mu=0.9, nesterov=nesterov, adjust=adjust)
    ref = _reference(params, grads, **kw)
    ours = _run(Muon, params, grads, ns_dtype=torch.float32, lr=0.05, weight_decay=0.1,
                momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)  # fmt: skip
    for p0, a, r in zip(params, ours, ref):
        assert (r - p0.double()).abs().max() > 0.05  # the steps move the weights ...
        torch.testing.assert_close(a.double(), r, rtol=0, atol=2e-5)  # ... as the reference
    bf16 = _run(Muon, params, grads, ns_dtype=torch.bfloat16, lr=0.05, weight_decay=0.1,
                momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)  # fmt: skip
    assert max((a.double() - r).abs().max() for a, r in zip(bf16, ref)) > 2e-4  # bf16: 10× coarser


def test_auto_dtype_is_bf16_only_where_native(monkeypatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert native_bf16("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert native_bf16("cpu", frozenset({"fp", "asimd", "bf16"}))  # ARM
    assert not native_bf16("cpu", frozenset({"avx2", "fma", "avx512f"}))  # emulated
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN told not to use AVX512-BF16
    assert not native_bf16("cpu", frozenset({"avx512_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert native_bf16("cpu", frozenset({"avx512_bf16"}))
    monkeypatch.setattr("denoiselab.train.muon.native_bf16", lambda device: False)
    assert resolve_ns_dtype("auto", "cpu") == torch.float32
    assert resolve_ns_dtype("bf16", "cpu") == torch.bfloat16
    monkeypatch.setattr("denoiselab.train.muon.native_bf16", lambda device: True)
    assert resolve_ns_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_ns_dtype("fp32", "cpu") == torch.float32


def test_the_config_picks_the_dtype_and_names_a_bad_one() -> None:
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = load_train_config(None, ["model.name=JiT-Micro", "optim.name=muon",
                                       f"optim.muon.ns_dtype={name}"]).optim  # fmt: skip
        opt = build_optimizer(cfg, _module(), 1e-3, torch.device("cpu"))
        assert opt._inner["muon"].ns_dtype == dtype
    with pytest.raises(ConfigError, match=r"optim.muon.ns_dtype='fp16' is not valid"):
        load_train_config(None, ["model.name=JiT-Micro", "optim.muon.ns_dtype=fp16"])


@pytest.mark.skipif(not has_muon(), reason="this torch has no torch.optim.Muon")
def test_state_dicts_are_torch_muons() -> None:
    """A state saved by ``torch.optim.Muon`` continues in ours exactly (and the dtype, not a
    group entry, is not overwritten by loading)."""
    params, grads = _params_and_grads(2, steps=4)
    kw = dict(lr=0.05, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    theirs_p = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = torch.optim.Muon(theirs_p, **kw)
    for step in grads[:2]:
        for p, g in zip(theirs_p, step):
            p.grad = g.clone()
        theirs.step()
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in theirs_p]
    ours = Muon(ours_p, ns_dtype=torch.bfloat16, **kw)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # else both lerp one buffer
    assert ours.state_dict()["param_groups"][0].keys() == theirs.state_dict()["param_groups"][0].keys()  # fmt: skip
    for step in grads[2:]:
        for p, q, g in zip(theirs_p, ours_p, step):
            p.grad, q.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    assert all(torch.equal(p, q) for p, q in zip(theirs_p, ours_p))
    assert ours.ns_dtype == torch.bfloat16


MUON = {"optim.name": "muon", "optim.muon.ns_dtype": "fp32", "device": "cpu", "duration_nimg": 32}


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        train(tiny(**MUON), out, quiet=True)
    finally:
        torch.distributed.destroy_process_group()
    end_process(0)  # a clean exit of a gloo process: see end_process's docstring


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_with_muon_equals_one_process_with_accumulation(tmp_path) -> None:
    torch.multiprocessing.spawn(
        _ddp_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=2, join=True
    )
    one = train(tiny(**MUON, grad_accum=2), tmp_path / "one", quiet=True)
    a, b = ckpt_io.load_checkpoint(tmp_path / "ddp"), ckpt_io.load_checkpoint(one)
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    bufs = [i for i in sa if "momentum_buffer" in sa[i]]
    assert bufs and all(
        torch.allclose(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"], rtol=1e-4, atol=1e-6)
        for i in bufs
    )
    other = ckpt_io.load_checkpoint(train(tiny(**MUON), tmp_path / "other", quiet=True))
    assert max((a.model[k] - other.model[k]).abs().max().item() for k in a.model) > 1e-5
