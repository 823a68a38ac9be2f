"""Text runs through the real loop and CLI: exact resume, 2-rank DDP equality, periodic
grids/evaluation keyed by captions, ``sample --prompt`` and its named errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from denoiselab.cli import main
from denoiselab.config import apply_overrides, from_dict
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config, restore
from denoiselab.train.checkpoint import CheckpointError
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

from .test_train import TINY

TEXT = {**TINY, "model": {"name": "JiT-Micro-T2I", "text": {"mode": "joint", "encoder": "words"}}}


def text_cfg(**overrides) -> TrainConfig:
    flat = [f"{k}={v}" for k, v in overrides.items()]
    return from_dict(TrainConfig, apply_overrides(TEXT, flat))


def _weights(run):
    ck = ckpt_io.load_checkpoint(run)
    out = {f"model.{k}": v for k, v in ck.model.items()}
    for d, params in ck.ema.items():
        out.update({f"ema{d}.{k}": v for k, v in params.items()})
    return out


@pytest.mark.parametrize("mode", ["joint", "cross"])
def test_text_run_resume_is_bit_exact(tmp_path, mode):
    cfg = text_cfg(**{"model.text.mode": mode})
    full = train(cfg, tmp_path / "full", quiet=True)
    half = train(replace(cfg, duration_nimg=32), tmp_path / "half", quiet=True)
    resumed = train(cfg, tmp_path / "half", resume=half, quiet=True)
    losses = [[r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (full, resumed)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and "model.cond_embedder.words.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the vocabulary is recorded with the run; the grid's prompts lie beside it
    resolved = yaml.safe_load((full / "config.yaml").read_text())["resolved_model"]["text"]
    assert "circle" in resolved["vocab"] and resolved["max_len"] >= 8
    grid_prompts = sorted((full / "samples").glob("*.txt"))
    assert grid_prompts and "background" in grid_prompts[0].read_text()


def test_text_run_learns_from_its_captions(tmp_path):
    """The words table, its positions, the text projection and the null token get gradients
    and move away from the run's own initial draw."""
    from denoiselab.models.registry import build_network
    from denoiselab.train.seeding import mix_seed

    cfg = text_cfg()
    run = train(cfg, tmp_path / "r", quiet=True)
    r = restore(run, ema=None)
    torch.manual_seed(mix_seed(cfg.seed, 0xA11CE))  # as the Trainer does before building
    init = build_network(r.model_cfg).state_dict()
    trained = r.net.state_dict()
    text_keys = ["cond_embedder.words.weight", "cond_embedder.pos", "cond_embedder.proj.weight",
                 "cond_embedder.null"]  # fmt: skip
    for key in text_keys:
        assert torch.isfinite(trained[key]).all()
        assert not torch.equal(trained[key], init[key]), key


def test_sample_prompts_reproducible_and_condition_flags_named(tmp_path, capsys):
    from PIL import Image

    run = train(text_cfg(duration_nimg=64), tmp_path / "r", quiet=True)
    base = ["sample", str(run), "--steps", "2", "--cfg", "3", "--no-ema"]

    def grid(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / name
        assert main([*base, *flags, "--out", str(out)]) == 0, capsys.readouterr().err
        return np.asarray(Image.open(out / "000000.png"))

    red = grid("red", "--prompt", "a large red circle on a plain blue background")
    assert np.array_equal(
        red, grid("red2", "--prompt", "a large red circle on a plain blue background")
    )
    assert not np.array_equal(
        red, grid("star", "--prompt", "a large green star on a plain blue background")
    )
    neg = grid("neg", "--prompt", "a large red circle on a plain blue background",
               "--negative-prompt", "a large red circle")  # fmt: skip
    assert not np.array_equal(red, neg)  # the negative prompt replaced the empty one in CFG
    prompts = (tmp_path / "red" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 4 and prompts[0].endswith(
        "a large red circle on a plain blue background"
    )
    file = tmp_path / "p.txt"
    file.write_text("a large red star\n\na small blue cross\n")
    assert (
        main([*base, "--prompts", str(file), "--per-prompt", "2", "--out", str(tmp_path / "f")])
        == 0
    )
    assert len(list((tmp_path / "f").glob("0*.png"))) == 4
    r = restore(run, ema=None)  # the library call the same CLI makes
    x = r.sample_prompts(["a large red circle on a plain blue background"] * 4, 0,
                         **r.settings(steps=2, cfg_scale=3))  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "red" / "000000.png")),
                          _png(x[0]))  # fmt: skip
    capsys.readouterr()

    def error(*flags: str) -> str:
        assert main([*base, *flags, "--out", str(tmp_path / "e")]) == 2
        return capsys.readouterr().err.strip()

    assert "has word(s) ['trinagle']" in error("--prompt", "a red trinagle")
    assert "is text-conditioned; give --prompt TEXT" in error("--class", "star")
    assert "--num is for sampling without prompts" in error("--prompt", "a red star", "--num", "2")
    assert "--negative-prompt needs --prompt" in error("--negative-prompt", "a red star")
    # --guidance reaches prompted sampling: sparse on this routing-free run is the sampler's
    # named error (the flag was dropped: CFG drew the prompts, exit 0), and with a negative
    # prompt, which only CFG can use, it says so
    assert "guidance 'sparse' guides a network trained with token routing" in error(
        "--prompt", "a red star", "--guidance", "sparse")  # fmt: skip
    assert "a negative prompt replaces CFG's unconditional branch" in error(
        "--prompt", "a red star", "--negative-prompt", "a circle", "--guidance", "sparse")  # fmt: skip
    cls_run = train(from_dict(TrainConfig, apply_overrides(TINY, ["duration_nimg=8"])),
                    tmp_path / "cls", quiet=True)  # fmt: skip
    assert (
        main(["sample", str(cls_run), "--prompt", "a red star", "--out", str(tmp_path / "c")]) == 2
    )
    assert "is class-conditional (no model.text)" in capsys.readouterr().err


def _png(x: torch.Tensor) -> np.ndarray:
    from denoiselab.metrics.images import to_uint8

    return to_uint8(x[None].float().cpu(), check_range=False)[0].permute(1, 2, 0).numpy()


@pytest.mark.slow
@pytest.mark.integration
def test_text_run_two_ddp_ranks_match_one_process(tmp_path):
    cfg_path = tmp_path / "text.yaml"
    cfg = dict(TEXT, duration_nimg=32, ckpt_every_nimg=32, sample={"steps": 2, "num_grid": 2})
    cfg["device"] = "cpu"
    probe = {"steps": 5, "num_train": 64, "num_val": 16, "batch": 16}
    cfg["eval"] = {"every_nimg": 32, "metrics": ["fd_probe", "acc_probe"], "num": 16, "batch": 4,
                   "steps": 2, "cache_dir": str(tmp_path / "cache"), "probe": probe}  # fmt: skip
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "denoiselab", "train", str(cfg_path), "--out", str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train(load_train_config(cfg_path, ["grad_accum=2"]), tmp_path / "one", quiet=True)
    a = ckpt_io.load_checkpoint(tmp_path / "ddp")
    b = ckpt_io.load_checkpoint(tmp_path / "one")
    assert a.step == b.step == 4 and "cond_embedder.words.weight" in a.model
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    evals = [[r for r in read_metrics(run / "metrics.jsonl") if "eval/acc_probe" in r]
             for run in (tmp_path / "ddp", tmp_path / "one")]  # fmt: skip
    assert evals[0] and evals[1]
    for key in ("eval/acc_probe", "eval/fd_probe"):
        assert evals[0][-1][key] == pytest.approx(evals[1][-1][key], rel=1e-3, abs=1e-4)


def test_eval_compositional_scores_prompted_samples_of_a_text_run(tmp_path, capsys):
    """``denoiselab eval --metrics compositional`` on a text run equals the compositional score
    computed here from the run's own prompt sampler (same prompts, seeds and settings), and
    scores the never-seen pairs apart; a class run is a named error."""
    import json

    from denoiselab.cli import main
    from denoiselab.metrics import AttributeProbeConfig, compositional_score, shapes_prompts
    from denoiselab.metrics.images import to_uint8
    from denoiselab.train.build import restore

    cfg = text_cfg(**{"data.num_images": 256, "data.holdout_pairs": "[red triangle]"})
    run = train(cfg, tmp_path / "run", quiet=True)
    cache = tmp_path / "cache"
    argv = ["eval", str(run), "--metrics", "compositional", "--num", "8", "--batch", "4",
            "--steps", "2", "--probe-steps", "30", "--cache-dir", str(cache), "--ema", "0.99",
            "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((tmp_path / "e" / "eval.json").read_text())
    r = restore(run, ema=0.99)
    settings = r.settings(2)
    prompts = shapes_prompts(r.cfg.data, 8, 0)
    assert sum(p.unseen for p in prompts) == 4  # half ask for the held-out pair

    def generate(texts, seed):
        return to_uint8(r.sample_prompts(list(texts), seed, **settings).cpu())

    ref = compositional_score(generate, prompts, dataset_cfg=r.cfg.data, batch=4, seed=0,
                              probe_config=AttributeProbeConfig(steps=30), cache_dir=cache)  # fmt: skip
    assert got["compositional"]["accuracy"] == ref["accuracy"]
    assert got["compositional"]["batch_seeds"] == ref["batch_seeds"]
    assert got["metrics"]["compositional/all_correct"] == ref["all_correct"]
    assert got["metrics"]["compositional_unseen/shape"] == ref["unseen"]["accuracy"]["shape"]
    capsys.readouterr()
    from .test_train import tiny

    class_run = train(tiny(), tmp_path / "class", quiet=True)
    argv[1], argv[-1] = str(class_run), str(tmp_path / "e2")
    assert main(argv) == 2
    assert "compositional' scores prompts" in capsys.readouterr().err


def test_resuming_with_another_vocabulary_is_a_named_error(tmp_path):
    """Word ids follow the sorted vocabulary: one word swapped for another keeps every shape
    but would read the embedding rows as other words. Refused, naming both words."""
    cfg = text_cfg(duration_nimg=32)
    run = train(cfg, tmp_path / "a", quiet=True)
    vocab = yaml.safe_load((run / "config.yaml").read_text())["resolved_model"]["text"]["vocab"]
    swapped = sorted([w for w in vocab if w != vocab[0]] + ["zebra"])
    other = text_cfg(**{"duration_nimg": 64, "model.text.vocab": json.dumps(swapped)})
    with pytest.raises(CheckpointError, match=rf"added \['zebra'\], removed \['{vocab[0]}'\]"):
        train(other, tmp_path / "b", resume=run, quiet=True)
    # the recorded vocabulary itself resumes
    same = text_cfg(**{"duration_nimg": 64, "model.text.vocab": json.dumps(vocab)})
    assert ckpt_io.load_checkpoint(train(same, tmp_path / "c", resume=run, quiet=True)).step == 8


def test_prompts_txt_names_the_prompts_each_batch_was_sampled_with(tmp_path, capsys):
    """Without --prompt a text run is sampled from captions of images of each label: in a
    batch drawn from noise seed s the j-th repeat of label y takes caption (j + s) mod n of
    the class (``text.data.prompts_for``). prompts.txt must name exactly those, and the label
    path must draw the same images as sampling those prompts directly."""
    from denoiselab.sampling.generate import balanced_labels

    run = train(text_cfg(duration_nimg=32), tmp_path / "r", quiet=True)
    r = restore(run, ema=None)
    k, table = r.model_cfg.num_classes, r.sampler.table()
    out = tmp_path / "s"
    flags = ["--steps", "1", "--no-ema", "--num", str(4 * k), "--batch", str(2 * k), "--seed", "7"]
    assert main(["sample", str(run), *flags, "--out", str(out)]) == 0, capsys.readouterr().err
    lines = (out / "prompts.txt").read_text().splitlines()  # "index<TAB>prompt"
    assert [int(line.split("\t")[0]) for line in lines] == list(range(4 * k))
    prompts = [line.split("\t", 1)[1] for line in lines]
    want = []
    for start in (0, 2 * k):  # batch seed: --seed + start (as `sample` draws it)
        seen: dict[int, int] = {}
        for y in balanced_labels(2 * k, k).tolist():
            j = seen[y] = seen.get(y, -1) + 1
            want.append(table[y][(j + 7 + start) % len(table[y])])
    assert prompts == want
    assert prompts[:k] != prompts[k : 2 * k]  # within a batch, a repeated label: next caption
    labels = balanced_labels(2 * k, k)
    by_label = r.sample(labels, 7 + 2 * k, steps=1)
    by_prompt = r.sample_prompts(prompts[2 * k :], 7 + 2 * k, steps=1)
    assert torch.equal(by_label, by_prompt)
