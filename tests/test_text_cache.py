"""Cached text embeddings (``denoiselab cache-text``, ``model.text.cache``) with a tiny random
transformers T5 encoder saved by ``save_pretrained`` and loaded through the real code: the
cache equals the live encoder, a run from the cache matches a live run, and an encoder or data
mismatch is a named error."""

from __future__ import annotations

import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from denoiselab.cli import main
from denoiselab.config import apply_overrides, from_dict
from denoiselab.data import build_dataset
from denoiselab.models.registry import build_network
from denoiselab.text import tokenizer_for
from denoiselab.text.embed_cache import TextCacheError, TextEmbeddings, cache_text
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import model_config_for
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

from .test_text_encoders import WORDS, _save
from .test_train import TINY

pytest.importorskip("transformers")


def t5_cfg(t5: Path, *overrides: str) -> TrainConfig:
    raw = {
        **TINY,
        "data": {"name": "shapes", "image_size": 16, "num_images": 24, "hflip": True},
        "model": {"name": "JiT-Micro-T2I",
                  "text": {"mode": "joint", "encoder": "t5", "path": str(t5), "max_len": 24}},
        "duration_nimg": 32, "ckpt_every_nimg": 32,
    }  # fmt: skip
    return from_dict(TrainConfig, apply_overrides(raw, list(overrides)))


def resolved(cfg: TrainConfig):
    ds = build_dataset(cfg.data)
    return ds, model_config_for(cfg, ds)


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> Path:
    """A tiny random T5 encoder whose word-level tokenizer knows left from right (so the
    mirrored caption of a shapes image tokenises differently)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = [*WORDS, "left", "right", "top", "bottom", "the", "in", "centre", "background"]
    path = _save("t5", tmp_path_factory.mktemp("t5"))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                      special_tokens=[("</s>", 1)])  # fmt: skip
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                num_heads=2, pad_token_id=0)  # fmt: skip
    transformers.T5EncoderModel(cfg).save_pretrained(path, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=24,
    ).save_pretrained(path)  # fmt: skip
    return path


def test_cached_embeddings_equal_the_live_encoder(t5, tmp_path):
    ds, mc = resolved(t5_cfg(t5))
    m = cache_text(ds, mc.text, tmp_path / "c32", dtype="float32", batch_size=5, shard_size=10)
    assert m["flips"] and m["num_images"] == 24 and len(m["shards"]) == 3
    half = cache_text(ds, mc.text, tmp_path / "c16", dtype="float16")
    net = build_network(mc)  # the live frozen encoder, loaded through the real code
    tokenize = tokenizer_for(mc.text)
    exact, fp16 = (TextEmbeddings(tmp_path / d, mc.text, ds) for d in ("c32", "c16"))
    from safetensors import safe_open

    with safe_open(tmp_path / "c16" / half["shards"][0]["file"], "pt") as f:
        assert half["dtype"] == "float16" and f.get_tensor("tokens").dtype == torch.float16
    for i in range(24):
        for mirrored in (False, True):
            ids = tokenize([ds.caption_variant(i, mirrored)])
            live, mask = net.text.encode(ids)
            got = exact.get(i, mirrored)
            assert got.shape == (24, 17)
            torch.testing.assert_close(got[:, :-1], live[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(got[:, -1] > 0.5, mask[0]) and mask[0].any() and not mask[0].all()
            torch.testing.assert_close(fp16.get(i, mirrored)[:, :-1], live[0], rtol=0, atol=2e-3)
    # the mirrored variant is stored where the caption differs (left/right)
    assert any(
        not torch.equal(*(tokenize([ds.caption_variant(i, m)]) for m in (False, True)))
        for i in range(24)
    )


def test_a_run_from_the_cache_matches_a_live_run_and_never_loads_the_encoder(
    t5, tmp_path, monkeypatch
):
    import denoiselab.text.hf as hf

    cfg = t5_cfg(t5)
    ds, mc = resolved(cfg)
    cache_text(ds, mc.text, tmp_path / "c", dtype="float32")
    loads = []
    real = hf.load_text_encoder

    def record(c):
        loads.append(traceback.format_stack())
        return real(c)

    monkeypatch.setattr(hf, "load_text_encoder", record)
    live = train(cfg, tmp_path / "live", quiet=True)
    assert loads, "the live run loads its encoder"
    loads.clear()
    cached = train(replace(cfg, model={**cfg.model, "text": {**cfg.model["text"],
                   "cache": str(tmp_path / "c")}}), tmp_path / "cached", quiet=True)  # fmt: skip
    # the encoder is loaded only to sample the end-of-run grid's prompts, never for a step
    assert all(any("denoiselab/sampling/" in frame for frame in stack) for stack in loads)
    la, lb = ([r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (live, cached))
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    a, b = ckpt_io.load_checkpoint(live), ckpt_io.load_checkpoint(cached)
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-6, msg=k)
    recorded = yaml.safe_load((cached / "config.yaml").read_text())["resolved_model"]["text"]
    assert recorded["cache"] == str(tmp_path / "c")


def test_encoder_or_data_mismatch_is_a_named_error(t5, tmp_path):
    import shutil

    enc = tmp_path / "enc"
    shutil.copytree(t5, enc)
    ds, mc = resolved(t5_cfg(enc))
    cache_text(ds, mc.text, tmp_path / "c", dtype="float16")
    TextEmbeddings(tmp_path / "c", mc.text, ds)  # the same encoder and data open
    with pytest.raises(TextCacheError, match=r"encoded with path=.*enc' but this run's text "
                       r"encoder has path=.*re-run `denoiselab cache-text`"):  # fmt: skip
        TextEmbeddings(tmp_path / "c", replace(mc.text, path=str(t5)), ds)
    weights = enc / "model.safetensors"  # retrained in place: same path, other weights
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    with pytest.raises(TextCacheError, match=r"encoded with fingerprint="):
        TextEmbeddings(tmp_path / "c", mc.text, ds)
    shutil.copy(t5 / "model.safetensors", weights)
    with pytest.raises(TextCacheError, match=r"max_len=24 but this run's text encoder has max_l"):
        TextEmbeddings(tmp_path / "c", replace(mc.text, max_len=20), ds)
    fewer = build_dataset(replace(t5_cfg(enc).data, num_images=12))
    with pytest.raises(TextCacheError, match=r"holds embeddings of 24 other captions than this "):
        TextEmbeddings(tmp_path / "c", mc.text, fewer)
    unflipped = build_dataset(replace(t5_cfg(enc).data, hflip=False))
    with pytest.raises(TextCacheError, match=r"or hflip differs"):
        TextEmbeddings(tmp_path / "c", mc.text, unflipped)
    with pytest.raises(TextCacheError, match=r"holds no text.json"):
        TextEmbeddings(tmp_path / "nothing", mc.text, ds)
    with pytest.raises(ValueError, match=r"model.text.cache='x' is for a frozen transformers"):
        replace(mc.text, encoder="words", path=None, cache="x")


def test_cache_text_cli(t5, tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    raw = {"data": {"name": "shapes", "image_size": 16, "num_images": 8},
           "model": {"name": "JiT-Micro-T2I", "text": {"encoder": "t5", "path": str(t5),
                                                      "max_len": 24}}}  # fmt: skip
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["cache-text", str(cfg), "--out", str(tmp_path / "c"), "--dtype", "bfloat16"]) == 0
    assert "8 captions → [24, 16] bfloat16 embeddings" in capsys.readouterr().out
    assert (tmp_path / "c" / "text.json").is_file()
    argv = ["cache-text", "t2i_quickstart", "--out", str(tmp_path / "w")]
    assert main(argv) == 2
    assert "the offline 'words' table is trained, not frozen" in capsys.readouterr().err
    images = tmp_path / "images" / "a"  # an --out inside the image folder would be a class
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "0.png")
    folder = ["data.name=imagefolder", f"data.root={images.parent}"]
    assert main(["cache-text", str(cfg), *folder, "--out", str(images.parent / "t")]) == 2
    assert "is in data.root" in capsys.readouterr().err
    assert not (images.parent / "t").exists()
    bad = ["cache-text", str(cfg), "--out", str(tmp_path / "b"), "--batch", "0"]
    assert main(bad) == 2  # was "range() arg 3 must not be zero"
    assert "batch_size=0 must be >= 1" in capsys.readouterr().err
