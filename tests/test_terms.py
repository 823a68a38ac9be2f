"""Loss terms that own parameters, through the real training loop: trained, clipped,
checkpointed, restored bit-exactly on resume, averaged across DDP ranks (also when a term
stops using them part-way), and logged.

The term used here (``gain``) is registered by the test: a learned vector ``w`` read against
the mean hidden state of block 0, ``weight·(⟨h̄, w⟩ − 1)²`` per sample, so its gradient
differs between samples (and hence between DDP ranks).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from denoiselab import algorithms
from denoiselab.algorithms import TermContext
from denoiselab.config import ConfigError
from denoiselab.objectives import LossTerm, StepContext
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config
from denoiselab.train.distributed import end_process
from denoiselab.train.loop import UnusedTermParametersError, train
from denoiselab.train.run import read_metrics

from .test_train import tiny


@dataclass(frozen=True)
class GainConfig:
    weight: float = 1.0
    stop_nimg: int = 0  # > 0: from this many images on, the term is 0 and skips its parameters
    may_skip: bool = True


class Gain(nn.Module, LossTerm):
    name = "gain"
    hidden_blocks = (0,)

    def __init__(self, cfg: GainConfig, dim: int) -> None:
        super().__init__()
        self.weight, self.stop_nimg, self.may_skip = cfg.weight, cfg.stop_nimg, cfg.may_skip
        self.w = nn.Parameter(torch.full((dim,), 0.1))
        self.frozen = (nn.Linear(dim, dim),)  # a frozen helper kept outside the module tree

    def forward(self, ctx: StepContext) -> torch.Tensor:
        if self.stop_nimg and ctx.nimg >= self.stop_nimg:  # a schedule that has ended
            return torch.zeros(ctx.x.shape[0], device=ctx.x.device)
        h = ctx.hidden[0].mean(1)  # [B, D]
        return self.weight * (h @ self.w - 1.0).pow(2)

    def logs(self, nimg: int) -> dict[str, float]:
        return {"gain/w_norm": float(self.w.detach().norm()), "gain/nimg": float(nimg)}


def _build(cfg: GainConfig, ctx: TermContext) -> Gain:
    return Gain(cfg, ctx.model_cfg.hidden_size)


@pytest.fixture
def gain_term():
    algorithms.register("gain", GainConfig, "test-only term with a parameter")(_build)
    yield
    del algorithms.TERMS["gain"]


def with_gain(weight: float = 1.0, stop_nimg: int = 0, may_skip: bool = True, **overrides):
    return replace(tiny(**overrides), terms={"gain": GainConfig(weight, stop_nimg, may_skip)})


def test_unknown_term_and_bad_field_are_named(gain_term):
    with pytest.raises(ConfigError, match=r"unknown loss term\(s\) \['repx'\].*valid: .*gain"):
        load_train_config(None, ["model.name=JiT-Micro", "terms.repx.weight=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'wieght' in terms.gain"):
        load_train_config(None, ["model.name=JiT-Micro", "terms.gain.wieght=1"])


def test_term_parameters_are_trained_checkpointed_and_logged(tmp_path, gain_term):
    run = train(with_gain(), tmp_path / "r", quiet=True)
    ck = ckpt_io.load_checkpoint(run)
    (name,) = [k for k in ck.objective if k.endswith(".w")]
    assert not torch.allclose(ck.objective[name], torch.full_like(ck.objective[name], 0.1))
    assert all(not k.startswith("objective") for k in ck.model)  # not in the sampling weights
    assert not any("frozen" in k for k in ck.objective)  # frozen helpers are never saved
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert "loss/gain" in rows[-1] and rows[-1]["gain/nimg"] == rows[-1]["nimg"]
    assert rows[-1]["gain/w_norm"] == pytest.approx(float(ck.objective[name].norm()), rel=1e-6)


def test_resume_restores_term_parameters_bit_exactly(tmp_path, gain_term):
    full = train(with_gain(), tmp_path / "full", quiet=True)
    half = train(with_gain(duration_nimg=32), tmp_path / "half", quiet=True)
    resumed = train(with_gain(), tmp_path / "half", resume=half, quiet=True)
    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(resumed)
    assert a.objective.keys() == b.objective.keys() and a.objective
    assert all(torch.equal(a.objective[k], b.objective[k]) for k in a.objective)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_resume_without_the_terms_state_is_a_named_error(tmp_path, gain_term):
    plain = train(tiny(duration_nimg=32), tmp_path / "plain", quiet=True)
    with pytest.raises(ckpt_io.CheckpointError, match="loss terms' state does not match"):
        train(with_gain(), tmp_path / "plain", resume=plain, quiet=True)


def test_a_term_that_skips_its_parameters_must_say_so(tmp_path, gain_term):
    """A term whose parameters get no gradient (its schedule ended) without ``may_skip``
    is a named error at that step, before the optimizer steps on un-averaged gradients."""
    cfg = with_gain(stop_nimg=16, may_skip=False, duration_nimg=32)
    with pytest.raises(UnusedTermParametersError, match=r"step 3: .*objective.extra.gain.w"):
        train(cfg, tmp_path / "r", quiet=True)


def test_a_skipping_term_leaves_its_parameters_untouched(tmp_path, gain_term):
    """With ``may_skip``, the steps that skip give no gradient, and AdamW leaves the
    parameter and its moments exactly where they were (no momentum drift)."""
    cfg = with_gain(stop_nimg=16, duration_nimg=32, ckpt_every_nimg=16, keep_checkpoints=2)
    run = train(cfg, tmp_path / "r", quiet=True)
    first, last = ckpt_io.list_checkpoints(run / "checkpoints")
    a, b = ckpt_io.load_checkpoint(first), ckpt_io.load_checkpoint(last)
    assert (a.step, b.step) == (2, 4)
    assert torch.equal(a.objective["extra.gain.w"], b.objective["extra.gain.w"])
    changed = [k for k in a.model if not torch.equal(a.model[k], b.model[k])]
    assert changed  # the network did train on
    w0 = torch.full_like(a.objective["extra.gain.w"], 0.1)
    assert not torch.equal(a.objective["extra.gain.w"], w0)  # and the term did before


def test_terms_need_distinct_names():
    from denoiselab.objectives import DenoisingObjective, ObjectiveConfig

    class Denoise(LossTerm):
        name = "denoise"

    with pytest.raises(ValueError, match=r"distinct names; got \['denoise', 'denoise'\]"):
        DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 8, extra_terms=[Denoise()])


def test_term_gradients_are_clipped_with_the_network(tmp_path, gain_term):
    # A huge term weight makes w's gradient dominate: the clipped (and logged) norm must be
    # the norm over network *and* term parameters, far above the network's own O(1) norm.
    run = train(with_gain(weight=1e6, duration_nimg=16), tmp_path / "r", quiet=True)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "grad_norm" in r]
    assert rows and min(r["grad_norm"] for r in rows) > 1e3
    plain = train(tiny(duration_nimg=16), tmp_path / "p", quiet=True)
    rows = [r for r in read_metrics(plain / "metrics.jsonl") if "grad_norm" in r]
    assert max(r["grad_norm"] for r in rows) < 1e2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    algorithms.register("gain", GainConfig, "test-only term with a parameter")(_build)
    try:
        # the term stops after 2 of 4 steps: DDP must allow its unused parameters
        train(with_gain(device="cpu", duration_nimg=32, stop_nimg=16), out, quiet=True)
    finally:
        torch.distributed.destroy_process_group()
    end_process(0)  # a clean exit of a gloo process: see end_process's docstring


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_averages_term_gradients(tmp_path, gain_term):
    torch.multiprocessing.spawn(
        _ddp_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=2, join=True
    )
    one = train(with_gain(device="cpu", duration_nimg=32, grad_accum=2, stop_nimg=16),
                tmp_path / "one", quiet=True)  # fmt: skip
    a, b = ckpt_io.load_checkpoint(tmp_path / "ddp"), ckpt_io.load_checkpoint(one)
    for k in a.objective:
        torch.testing.assert_close(a.objective[k], b.objective[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    # sensitive: without the shard split (one micro-batch) the term's parameters differ
    other = train(with_gain(device="cpu", duration_nimg=32, stop_nimg=16), tmp_path / "other",
                  quiet=True)  # fmt: skip
    c = ckpt_io.load_checkpoint(other)
    assert max((a.objective[k] - c.objective[k]).abs().max().item() for k in a.objective) > 1e-6
