"""`denoiselab convert jit-official`: an official JiT checkpoint becomes a run that samples,
evaluates and resumes, computing the same function as the official network.

The official network here is `tests/official_jit.py`, an independent re-implementation written
from a reading of the official code (names and layout as there), never denoiselab's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from denoiselab.cli import main
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import restore
from tests import official_jit as oj

ARCH = oj.ARCH
_inputs, _loss, _official = oj.inputs, oj.loss, oj.make_official_checkpoint


def _convert(path, out, *extra):
    return main(
        [
            "convert",
            "jit-official",
            str(path),
            "--out",
            str(out),
            "--train-images",
            "64",
            "data.name=shapes",
            "data.root=null",
            *extra,
        ]
    )


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _net_with(state, den):
    net = oj.Denoiser(**ARCH)
    net.load_state_dict(state)
    return net.net.eval()


def test_official_checkpoint_converts_to_the_same_function(tmp_path):
    den, _, path, (ema1, ema2) = _official(tmp_path)
    run = tmp_path / "run"
    assert _convert(path, run) == 0
    z, t, y = _inputs()
    with torch.no_grad():
        for ema, official in (
            (None, den.net),
            (0.9999, _net_with(ema1, den)),
            (0.9996, _net_with(ema2, den)),
        ):
            ours = restore(run, ema=ema).net
            ref = official(z, t, y)
            assert ref.abs().mean() > 0.1  # a real output, not zeros
            assert _rel(ours(z, t, y), ref) < 1e-6, ema
    r = restore(run, ema=None)
    mc, cfg = r.model_cfg, r.cfg
    assert (mc.hidden_size, mc.depth, mc.num_heads, mc.bottleneck) == (64, 6, 4, 8)
    assert (mc.in_context_len, mc.in_context_start, mc.num_classes) == (3, 4, 8)
    # epoch 1 finished → 2 epochs of ceil(64 / 2 ranks) // 4 = 8 steps at global batch 8
    assert r.checkpoint.step == 16 and cfg.global_batch == 8
    assert cfg.ema.decays == (0.9999, 0.9996) and cfg.sample.cfg == 2.9
    assert cfg.sample.interval == (0.1, 1.0) and cfg.objective.time.mu == -0.8
    assert cfg.optim.lr == 4e-4 and cfg.duration_nimg == 4 * 8 * 8
    record = json.loads((run / "convert.json").read_text())
    assert record["optimizer"] == "converted" and record["official_args"]["cfg"] == 2.9


def test_converted_adam_moments_take_the_same_step_as_the_official_optimizer(tmp_path):
    """One more AdamW step on both sides from the same loss: a moment mapped onto the wrong
    parameter (or lost) makes the two networks differ after the step."""
    den, opt, path, _ = _official(tmp_path)
    run = tmp_path / "run"
    assert _convert(path, run) == 0
    ck = ckpt_io.load_checkpoint(run)
    ours = restore(run, ema=None).net.train()
    ours_opt = torch.optim.AdamW(list(ours.parameters()), lr=1e-2, betas=(0.9, 0.95))
    ours_opt.load_state_dict(ck.optimizer)
    for o in (opt, ours_opt):
        for group in o.param_groups:
            group["lr"] = 1e-2
    fresh = torch.optim.AdamW(list(restore(run, ema=None).net.parameters()), lr=1e-2)
    for net, o in ((den.net, opt), (ours, ours_opt)):
        o.zero_grad()
        _loss(net, seed=99).backward()
        o.step()
    z, t, y = _inputs(seed=3)
    with torch.no_grad():
        assert _rel(ours(z, t, y), den.net(z, t, y)) < 1e-5
    # the check has teeth: the same step from zero moments lands elsewhere
    other = restore(run, ema=None).net
    fresh = torch.optim.AdamW(list(other.parameters()), lr=1e-2, betas=(0.9, 0.95))
    _loss(other, seed=99).backward()
    fresh.step()
    with torch.no_grad():
        assert _rel(other(z, t, y), den.net(z, t, y)) > 1e-3


@pytest.mark.slow
@pytest.mark.integration
def test_converted_run_samples_and_resumes(tmp_path, capsys):
    _, _, path, _ = _official(tmp_path)
    run = tmp_path / "run"
    assert _convert(path, run) == 0
    assert (
        main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    )
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2
    # resume: 2 more optimizer steps on the built-in shapes data (8 classes, 16 px)
    assert (
        main(
            [
                "train",
                "--resume",
                str(run),
                "--steps",
                "18",
                "sample_every_nimg=1000000",
                "ckpt_every_nimg=8",
                "log_every_nimg=8",
                "device=cpu",
            ]
        )
        == 0
    )
    assert ckpt_io.load_checkpoint(run).step == 18


def test_split_swiglu_fork_converts_to_the_same_function(tmp_path):
    den, _, path, _ = _official(tmp_path)
    ck = torch.load(path, weights_only=False)  # our own test file
    for key in ("model", "model_ema1", "model_ema2"):
        state = ck[key]
        for name in [k for k in state if ".mlp.w12." in k]:
            w1, w2 = state.pop(name).chunk(2)
            state[name.replace("w12", "w1")], state[name.replace("w12", "w2")] = w1, w2
    torch.save(ck, path)
    assert _convert(path, tmp_path / "run") == 0
    z, t, y = _inputs()
    with torch.no_grad():
        assert _rel(restore(tmp_path / "run", ema=None).net(z, t, y), den.net(z, t, y)) < 1e-6
    assert (
        "fresh moments" in json.loads((tmp_path / "run" / "convert.json").read_text())["optimizer"]
    )


def _edit(path, fn):
    ck = torch.load(path, weights_only=False)
    fn(ck)
    torch.save(ck, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda ck: ck["model"].pop("net.blocks.2.attn.proj.weight"),
            "model: missing key(s) 'blocks.2.attn.proj.weight'",
        ),
        (
            lambda ck: ck["model_ema1"].__setitem__(
                "net.blocks.1.attn.qkv.weight", torch.zeros(5, 64)
            ),
            "model_ema1: 'blocks.1.attn.qkv.weight' has shape [5, 64]; the network implied by the other weights needs [192, 64]",
        ),
        (
            lambda ck: ck["model"].__setitem__("net.extra.weight", torch.zeros(1)),
            "unexpected key(s) 'extra.weight'",
        ),
        (lambda ck: ck.pop("model_ema2"), "lacks ['model_ema2']"),
        (
            lambda ck: ck["model"].__setitem__(
                "net.feat_rope.freqs_cos", ck["model"]["net.feat_rope.freqs_cos"].flip(0)
            ),
            "'feat_rope.freqs_cos' (shape [16, 16]) is not the official table",
        ),
        (
            lambda ck: ck["args"].__setattr__("class_num", 10),
            "args.class_num=10 but y_embedder.embedding_table.weight has 8 + 1 rows",
        ),
    ],
)
def test_bad_checkpoints_are_named_errors(tmp_path, capsys, edit, message):
    _, _, path, _ = _official(tmp_path)
    _edit(path, edit)
    assert _convert(path, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("denoiselab convert: error: ") and message in err, err
    assert not ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")


class _Trap:
    """Unpickling this object would create a file: the converter must refuse it unread."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


def test_arbitrary_pickled_objects_are_refused_not_unpickled(tmp_path, capsys):
    _, _, path, _ = _official(tmp_path, output_dir=_Trap(str(tmp_path / "pwned")))
    assert _convert(path, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "refers to 'getattr'" in err, err
    assert not (tmp_path / "pwned").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    _, _, path, _ = _official(tmp_path)
    assert _convert(path, tmp_path / "run") == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert _convert(path, tmp_path / "run") == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert before == after


def test_missing_file_is_named(tmp_path, capsys):
    assert _convert(tmp_path / "nope.pth", tmp_path / "run") == 2
    assert "nope.pth' does not exist" in capsys.readouterr().err
