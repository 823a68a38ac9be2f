"""Optimizer registry: the Muon/AdamW split, Muon's update against a written-out reference,
one state dict for both, and exact resume through the real training loop."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from denoiselab.config import ConfigError
from denoiselab.models import build_model
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config
from denoiselab.train.config import OptimConfig
from denoiselab.train.loop import train
from denoiselab.train.module import TrainingModule
from denoiselab.train.optim import MuonWithAdamW, build_optimizer, muon_split

from .test_train import tiny


def _module() -> TrainingModule:
    torch.manual_seed(0)
    return TrainingModule(
        build_model("JiT-Micro"), DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10)
    )


def test_muon_takes_exactly_the_blocks_hidden_matrices():
    named = list(_module().named_parameters())
    muon, adamw = muon_split(named)
    ids = {id(p) for p in muon}
    chosen = sorted(n for n, p in named if id(p) in ids)
    depth = 2  # JiT-Micro
    expected = sorted(
        f"model.blocks.{i}.{w}.weight"
        for i in range(depth)
        for w in ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")
    )
    assert chosen == expected
    assert len(muon) + len(adamw) == len(named)
    # the adaLN modulation, embeddings and final layer stay with AdamW
    rest = {n for n, p in named if id(p) not in ids}
    assert {"model.blocks.0.ada.linear.weight", "model.final_layer.linear.weight"} <= rest
    assert "model.patch_embed.proj2.weight" in rest and "model.t_embedder.mlp.0.weight" in rest


def _newton_schulz5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic iteration, written out in float32: X ← aX + (bA + cA²)X,
    A = XXᵀ, from X = G/‖G‖ (rows ≤ columns)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if transposed else x


def test_muon_step_matches_a_written_out_reference():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(12, 8))
    named = [("model.blocks.0.attn.qkv.weight", w)]
    cfg = OptimConfig(name="muon", weight_decay=0.0)
    opt = build_optimizer(cfg, _Wrap(named), lr=0.1, device=torch.device("cpu"))
    w0 = w.detach().clone()
    grads = [torch.randn(12, 8), torch.randn(12, 8)]
    buf = torch.zeros(12, 8)
    expected = w0.clone()
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.95 * buf + g  # momentum, then the Nesterov look-ahead
        update = _newton_schulz5(g + 0.95 * buf)
        expected -= 0.1 * 0.2 * math.sqrt(max(12, 8)) * update  # match_rms_adamw scaling
    # ns_dtype auto may iterate in bf16: agreement to ~1 % of the two steps' movement (a wrong
    # rate scaling — Keller's √max(1, A/B) = 1.22 instead of 0.2·√12 = 0.69 — or momentum
    # rule moves the weights by several times this tolerance)
    assert (expected - w0).abs().max() > 5e-2
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=4e-3)


class _Wrap(torch.nn.Module):
    """A module whose ``named_parameters`` are the given pairs (names kept verbatim)."""

    def __init__(self, named):
        super().__init__()
        self._named = named

    def named_parameters(self, *args, **kwargs):
        return iter(self._named)


def test_one_state_dict_for_both_and_it_round_trips():
    module = _module()
    opt = build_optimizer(OptimConfig(name="muon"), module, 1e-3, torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    assert {g["algorithm"] for g in opt.param_groups} == {"muon", "adamw"}
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state tensors
    assert len(state["state"]) == sum(1 for _ in module.parameters())  # both kinds of state

    clone = _module()
    opt2 = build_optimizer(OptimConfig(name="muon"), clone, 1e-3, torch.device("cpu"))
    opt2.load_state_dict(state)
    clone.load_state_dict(module.state_dict())
    for p, q in zip(module.parameters(), clone.parameters()):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()  # the inner optimizers must see the loaded state, not fresh state
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), clone.parameters()))


def test_muon_run_resumes_bit_exactly(tmp_path):
    cfg = tiny(**{"optim.name": "muon"})
    full = train(cfg, tmp_path / "full", quiet=True)
    half = train(replace(cfg, duration_nimg=32), tmp_path / "half", quiet=True)
    resumed = train(cfg, tmp_path / "half", resume=half, quiet=True)
    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(resumed)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    plain = ckpt_io.load_checkpoint(train(tiny(), tmp_path / "adamw", quiet=True))
    assert any(not torch.equal(a.model[k], plain.model[k]) for k in a.model)


def test_bad_optimizer_settings_are_named():
    with pytest.raises(ConfigError, match=r"optim.name='sgd'; valid: adamw, muon"):
        load_train_config(None, ["model.name=JiT-Micro", "optim.name=sgd"])
    with pytest.raises(ConfigError, match=r"optim.muon.momentum=1.0"):
        load_train_config(None, ["model.name=JiT-Micro", "optim.muon.momentum=1.0"])
    with pytest.raises(ConfigError, match=r"adjust_lr='keller'"):
        load_train_config(None, ["model.name=JiT-Micro", "optim.muon.adjust_lr=keller"])
