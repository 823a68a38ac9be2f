"""``strategy: fsdp`` (FSDP2 + sharded checkpoints) through the real trainer, on CPU with gloo.

One process (a one-rank group): equal bit for bit to ``ddp`` (nothing is sharded, the same
arithmetic), with and without activation checkpointing; resume from a sharded checkpoint,
from a safetensors pair, and a DDP run resumed from a sharded checkpoint, all bit-exact;
bf16 mixed precision keeps fp32 master weights and EMAs. Two ranks (spawned): equal to one
process with the same global batch (float tolerance: FSDP reduce-scatters where one process
accumulates), resume at the same world size bit-exact, re-sharding 2 → 1 and 1 → 2, a loss
term's parameters sharded and averaged, and the consolidated pair equal to the live state
gathered by all-gather. Kills and stop signals: ``test_fsdp_faults.py``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from denoiselab import algorithms
from denoiselab.cli import main
from denoiselab.config import ConfigError
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train import sharded
from denoiselab.train.distributed import end_process
from denoiselab.train.loop import Trainer, train
from denoiselab.train.run import read_metrics

from .test_faults import state_of
from .test_terms import GainConfig, _build, _free_port, with_gain
from .test_train import _weights, tiny


def fsdp(**overrides):
    return tiny(strategy="fsdp", device="cpu", **overrides)


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# -- one process ------------------------------------------------------------------------------
def test_fsdp_on_one_process_equals_ddp_and_says_so(tmp_path, capsys):
    ref = train(tiny(device="cpu"), tmp_path / "ddp", quiet=True)
    run = train(fsdp(), tmp_path / "fsdp")
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "strategy fsdp on one process" in ln]
    assert len(notes) == 1 and "nothing is sharded" in notes[0]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000000004.dcp", "step_000000008.dcp", "step_000000008.safetensors",
                     "step_000000008.state.safetensors"], names  # fmt: skip
    assert "consolidated step_000000008.dcp → step_000000008.safetensors" in err
    assert not _equal(state_of(ref), state_of(run))  # the pair, bit for bit
    # the sharded folder itself, read whole, holds the same state
    assert not _equal(state_of(ref), state_of(run / "checkpoints" / "step_000000008.dcp"))
    assert torch.distributed.is_initialized() is False  # its one-rank group was released
    # the loss log is the same
    rows = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert rows == [r["loss"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r]


def test_fsdp_resume_from_sharded_checkpoint_and_from_pair_is_bit_exact(tmp_path, capsys):
    full = train(fsdp(), tmp_path / "full", quiet=True)
    half = train(fsdp(duration_nimg=32), tmp_path / "half", quiet=True)  # DCP + pair at step 4
    capsys.readouterr()
    train(fsdp(), half, resume=half)  # the run folder: the sharded folder is preferred
    assert "resumed from " + str(half / "checkpoints" / "step_000000004.dcp") in (
        capsys.readouterr().err
    )
    assert not _equal(state_of(full), state_of(half))
    # a safetensors pair (e.g. consolidated, or written by DDP) resumes FSDP too: each rank
    # cuts its slices from the whole tensors
    pair = train(fsdp(duration_nimg=32), tmp_path / "pair", quiet=True)
    sharded.remove(pair / "checkpoints" / "step_000000004.dcp")
    train(fsdp(), pair, resume=pair / "checkpoints" / "step_000000004.safetensors", quiet=True)
    assert not _equal(state_of(full), state_of(pair))


def test_ddp_resumes_a_sharded_checkpoint_bit_exactly(tmp_path):
    full = train(tiny(device="cpu"), tmp_path / "full", quiet=True)
    half = train(fsdp(duration_nimg=32, consolidate_at_end=False), tmp_path / "half", quiet=True)
    assert not (half / "checkpoints" / "step_000000004.safetensors").exists()
    train(tiny(device="cpu"), half, resume=half, quiet=True)  # reads the folder whole
    assert not _equal(state_of(full), state_of(half))


def test_activation_checkpointing_changes_nothing(tmp_path):
    """Recomputed blocks give the same gradients; dropout redraws the same masks (the RNG
    state is restored for the recomputation)."""
    base = dict(duration_nimg=24, ckpt_every_nimg=0)
    # dropout acts in the middle half of the blocks: 4 blocks, so that blocks 1 and 2 have it
    with_dropout = {"model.dropout": 0.3, "model.depth": 4}
    ref = train(tiny(device="cpu", **base, **with_dropout), tmp_path / "ref", quiet=True)
    for strategy in ("ddp", "fsdp"):
        run = train(tiny(device="cpu", strategy=strategy, activation_checkpointing=True,
                         **base, **with_dropout), tmp_path / strategy, quiet=True)  # fmt: skip
        assert not _equal(_weights(ref), _weights(run)), strategy
    # sensitive: the dropout is real (without it the weights differ)
    plain = train(tiny(device="cpu", **base, **{"model.depth": 4}), tmp_path / "plain", quiet=True)
    assert _equal(_weights(ref), _weights(plain))


def test_bf16_keeps_fp32_master_weights_and_emas(tmp_path):
    cfg = fsdp(precision="bf16", duration_nimg=16, ckpt_every_nimg=0, consolidate_at_end=False)
    trainer = Trainer(cfg, tmp_path / "bf16", quiet=True)
    try:
        seen: dict[str, torch.dtype] = {}
        block = trainer.model.blocks[0]
        handle = block.register_forward_pre_hook(
            lambda m, args: seen.setdefault("gathered", m.attn.qkv.weight.dtype) and None
        )
        trainer.run()
        handle.remove()
        assert seen["gathered"] == torch.bfloat16  # computed with bf16 parameters
        params = list(trainer.module.parameters())
        assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in params)
        assert all(p.dtype == torch.float32 for d in trainer.ema.decays
                   for p in trainer.ema.state(d).values())  # fmt: skip
        moments = [v for s in trainer.optimizer.state.values() for v in s.values() if v.ndim]
        assert moments and all(m.dtype == torch.float32 for m in moments)
    finally:
        trainer.close()
    # close to DDP under bf16 autocast (same ops; FSDP rounds every parameter to bf16, autocast
    # only those of autocast ops)
    ddp = train(replace(cfg, strategy="ddp"), tmp_path / "ddp", quiet=True)
    loss = [r["loss"] for r in read_metrics(ddp / "metrics.jsonl") if "loss" in r]
    got = [r["loss"] for r in read_metrics(tmp_path / "bf16" / "metrics.jsonl") if "loss" in r]
    assert got == pytest.approx(loss, rel=2e-2)


def test_consolidate_command_writes_the_pair_of_a_sharded_checkpoint(tmp_path, capsys):
    run = train(fsdp(consolidate_at_end=False), tmp_path / "run", quiet=True)
    dcp4 = run / "checkpoints" / "step_000000004.dcp"
    assert not list((run / "checkpoints").glob("*.safetensors"))
    assert main(["consolidate", str(run), "--step", "4"]) == 0
    pair = run / "checkpoints" / "step_000000004.safetensors"
    assert str(pair) in capsys.readouterr().out
    assert not _equal(state_of(pair), state_of(dcp4))
    assert main(["consolidate", str(run), "--step", "5"]) == 2
    assert "no sharded checkpoint of step 5" in capsys.readouterr().err
    # sample/eval read a run with only sharded checkpoints as they are
    assert main(["sample", str(tmp_path / "run"), "--num", "2", "--steps", "2", "--device",
                 "cpu", "--out", str(tmp_path / "s")]) == 0  # fmt: skip


def test_corrupt_shard_falls_back_and_an_explicit_one_is_an_error(tmp_path, capsys):
    run = train(fsdp(consolidate_at_end=False), tmp_path / "run", quiet=True)
    newest = run / "checkpoints" / "step_000000008.dcp"
    shard = next(newest.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10  # one flipped bit in the tensor data (the header still parses)
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt_io.CheckpointError, match="fails the checksum"):
        ckpt_io.load_checkpoint(newest)
    assert main(["train", "--resume", str(newest), "--out", str(run)]) == 2
    assert "fails the checksum" in capsys.readouterr().err
    # the run folder: one line names the bad checkpoint, the previous one is used
    trainer = Trainer(fsdp(consolidate_at_end=False), run, resume=run)
    try:
        assert trainer.start_step == 4
    finally:
        trainer.close()
    err = capsys.readouterr().err
    assert "step_000000008.dcp' is corrupt" in err and "previous checkpoint" in err
    stale = newest.with_name(newest.name + ".stale")  # set aside: the run continues from 4
    assert stale.is_dir() and not newest.exists()
    # a manifest that was tampered with, or a shard file cut short
    (stale / "manifest.json").write_text((stale / "manifest.json").read_text().replace("8", "9"))
    with pytest.raises(ckpt_io.CheckpointError, match="manifest fails the checksum"):
        sharded.read_manifest(stale)
    older = run / "checkpoints" / "step_000000004.dcp"
    shard = next(older.glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(ckpt_io.CheckpointError, match="missing or cut"):
        ckpt_io.load_for_resume(older)


def test_a_sharded_checkpoint_never_unpickles(tmp_path):
    """DCP's own metadata format is a pickle; ours is never written nor read: a malicious
    ``.metadata`` and ``.distcp`` placed in a folder do nothing."""
    from .test_no_pickle import _Evil

    run = train(fsdp(duration_nimg=8, consolidate_at_end=False), tmp_path / "run", quiet=True)
    folder = run / "checkpoints" / "step_000000001.dcp"
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps({"x": _Evil(marker)}))  # DCP's format
    (folder / "__0_0.distcp").write_bytes(pickle.dumps({"x": _Evil(marker)}))
    ck = ckpt_io.load_checkpoint(folder)
    assert ck.step == 1 and not marker.exists()
    t = Trainer(fsdp(duration_nimg=8), run, resume=run, quiet=True)
    t.close()
    assert not marker.exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, strategy):
    """DDP compiles the network whole, FSDP each block in place (the modes themselves are
    torch's; compiled FSDP with activation checkpointing equals eager to 5e-8 on CPU)."""
    seen = []

    def fake_compile(fn, *args, mode=None, **kwargs):
        seen.append((getattr(fn, "__qualname__", type(fn).__name__), mode))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = tiny(device="cpu", strategy=strategy, compile=True,
               compile_mode="max-autotune-no-cudagraphs")  # fmt: skip
    Trainer(cfg, tmp_path / "run", quiet=True).close()
    modes = {mode for _, mode in seen}
    assert modes == {"max-autotune-no-cudagraphs"}, seen
    assert len(seen) == (1 if strategy == "ddp" else 2), seen  # JiT-Micro has 2 blocks


def test_bad_strategy_settings_are_named_config_errors():
    with pytest.raises(ConfigError, match=r"strategy='zero'.*ddp.*fsdp"):
        tiny(strategy="zero")
    with pytest.raises(ConfigError, match=r"strategy='zero'; valid: ddp, fsdp"):
        replace(tiny(), strategy="zero")  # built directly, not from a mapping
    with pytest.raises(ConfigError, match=r"muon.*fsdp.*adamw"):
        tiny(strategy="fsdp", **{"optim.name": "muon"})
    with pytest.raises(ConfigError, match=r"reduce-overhead.*fsdp"):
        tiny(strategy="fsdp", compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match=r"compile_mode='fast'.*max-autotune"):
        tiny(compile_mode="fast")


# -- two ranks --------------------------------------------------------------------------------
def _two_rank_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    algorithms.register("gain", GainConfig, "test-only term with a parameter")(_build)
    r = Path(root)
    cfg = with_gain(device="cpu", strategy="fsdp")
    try:
        # A: 8 steps on 2 ranks; the live state gathered whole (an all-gather) at the end
        trainer = Trainer(cfg, r / "A", quiet=True)
        trainer.run()
        whole = trainer.parallel.gather(trainer.model.state_dict())
        whole.update({f"ema.{k}": v for k, v in trainer.parallel.gather(
            trainer.ema.state(0.9)).items()})  # fmt: skip
        if rank == 0:
            save_file({k: v.contiguous() for k, v in whole.items()}, str(r / "gathered.st"))
        trainer.close()
        # B: the same run resumed at step 4 from A's sharded checkpoint
        train(cfg, r / "B", resume=r / "A" / "checkpoints" / "step_000000004.dcp", quiet=True)
        # D: re-sharding 1 → 2: resumed from a one-process run's step-4 checkpoint
        train(cfg, r / "D", resume=r / "one" / "checkpoints" / "step_000000004.dcp", quiet=True)
    finally:
        torch.distributed.destroy_process_group()
    end_process(0)  # a clean exit of a gloo process: see end_process's docstring


@pytest.mark.slow
@pytest.mark.integration
def test_two_fsdp_ranks_equal_one_process_resume_and_reshard(tmp_path, gain_term):
    # one process, the same global batch as two micro-batches (shards 0 and 1): written first,
    # so that the two ranks can also resume from its step-4 checkpoint (1 → 2)
    one_cfg = with_gain(device="cpu", strategy="fsdp", grad_accum=2)
    one = train(one_cfg, tmp_path / "one", quiet=True)
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    a, b, d, o = (state_of(tmp_path / x) for x in ("A", "B", "D", "one"))
    # FSDP on 2 ranks = one process (float tolerance: a reduce-scatter sums in another order)
    for k in o:
        torch.testing.assert_close(a[k], o[k], rtol=1e-4, atol=1e-5, msg=k)
    print(f"\nFSDP (2 ranks) vs one process: max |Δ| = "
          f"{max((a[k] - o[k]).abs().max().item() for k in o):.2e} over every tensor")  # fmt: skip
    assert any(k.startswith("objective.") for k in a)  # the loss term's parameter, sharded
    # resumed on the same 2 ranks: bit for bit
    assert not _equal(a, b)
    # 2 → 1: one process resumes A's step-4 sharded checkpoint
    c = train(one_cfg, tmp_path / "C", resume=tmp_path / "A" / "checkpoints" /
              "step_000000004.dcp", quiet=True)  # fmt: skip
    for k, v in state_of(c).items():
        torch.testing.assert_close(v, a[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in d:  # 1 → 2
        torch.testing.assert_close(d[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # the consolidated pair = the live state gathered by all-gather, bit for bit
    gathered = load_file(str(tmp_path / "gathered.st"))
    ck = ckpt_io.load_checkpoint(tmp_path / "A" / "checkpoints" / "step_000000008.safetensors")
    pair = {**ck.model, **{f"ema.{k}": v for k, v in ck.ema[0.9].items()}}
    assert not _equal(gathered, pair)
    assert (tmp_path / "A" / "samples" / "step_000000008.png").is_file()  # grid: gathered too
    # the loss rows, averaged over ranks, equal one process's
    rows = [r["loss"] for r in read_metrics(tmp_path / "A" / "metrics.jsonl") if "loss" in r]
    ref = [r["loss"] for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    assert rows == pytest.approx(ref, rel=1e-4)
    # sensitive: one micro-batch instead of the two shards trains other weights
    other = train(with_gain(device="cpu", strategy="fsdp"), tmp_path / "other", quiet=True)
    assert max((state_of(other)[k] - a[k]).abs().max().item() for k in a) > 1e-3


@pytest.fixture
def gain_term():
    algorithms.register("gain", GainConfig, "test-only term with a parameter")(_build)
    yield
    del algorithms.TERMS["gain"]
