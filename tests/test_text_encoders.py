"""Real text encoders through denoiselab's loader: tiny random transformers models (T5
encoder, CLIP text tower, an encoder–decoder through AutoModel) and a word-level tokenizer,
saved locally and loaded by path, as a user's T5/CLIP/T5Gemma directory would be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from denoiselab.config import ConfigError
from denoiselab.models.registry import build_network, model_config
from denoiselab.text import PAD, TextConfig, tokenizer_for
from denoiselab.text.data import resolve_text

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<pad>", "</s>", "<unk>", "a", "small", "red", "circle", "on", "blue", "large", "star"]


def _tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=max_len,
    )  # fmt: skip


def _save(kind: str, path: Path) -> Path:
    torch.manual_seed(0)
    n = len(WORDS)
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=n, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                    num_decoder_layers=1, num_heads=2, pad_token_id=0)  # fmt: skip
        model = transformers.T5EncoderModel(cfg)
    elif kind == "auto":  # an encoder–decoder: denoiselab keeps its encoder (T5Gemma-style)
        cfg = transformers.T5Config(vocab_size=n, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                    num_decoder_layers=1, num_heads=2, pad_token_id=0)  # fmt: skip
        model = transformers.T5Model(cfg)
    else:
        cfg = transformers.CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          max_position_embeddings=8, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=1)  # fmt: skip
        model = transformers.CLIPTextModel(cfg)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(8).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["t5", "clip", "auto"])
def test_transformers_encoder_through_the_interface(tmp_path, kind):
    path = _save(kind, tmp_path / kind)
    text = TextConfig(encoder=kind, path=str(path))
    cfg = resolve_text(model_config("JiT-Micro-T2I", text=text), dataset=None)
    assert cfg.text.dim == 16 and cfg.text.max_len == 8  # from config.json and the tokenizer
    tok = tokenizer_for(cfg.text)
    ids = tok(["a small red circle", ""])
    assert ids[0].tolist() == [3, 4, 5, 6, 1, PAD, PAD, PAD]  # the tokenizer's own ids + </s>
    assert ids[1].tolist() == [PAD] * 8  # empty prompt: all padding
    net = build_network(cfg)
    tokens, mask = net.text.encode(ids)
    assert tokens.shape == (2, 8, 16) and mask.tolist()[0] == [True] * 5 + [False] * 3
    # reference: the transformers model called directly with its attention mask
    ref_cls = {"t5": "T5EncoderModel", "clip": "CLIPTextModel", "auto": "T5EncoderModel"}[kind]
    ref = getattr(transformers, ref_cls).from_pretrained(path).eval()
    with torch.no_grad():
        expect = ref(input_ids=torch.tensor([[3, 4, 5, 6, 1]])).last_hidden_state
    torch.testing.assert_close(tokens[0, :5], expect[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens[0, 5:], torch.zeros(3, 16)) and torch.equal(tokens[1], tokens[1] * 0)
    # the frozen encoder is not part of the network: not in state_dict, not trained
    assert not any("model." in k or "encoder" in k for k in net.state_dict())
    out = net(torch.randn(2, 3, 16, 16), torch.rand(2), ids)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.warns(UserWarning, match=r"prompt 'a small red circle on a blue large star' has "
                      r"10 tokens but the text encoder takes at most max_len=8"):  # fmt: skip
        long = tok(["a small red circle on a blue large star"])
    assert long[0].tolist()[-1] == 1  # truncated by the tokenizer, keeping its end token


def test_missing_or_pickled_encoder_is_a_named_error(tmp_path):
    bare = _save("clip", tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    cfg = model_config("JiT-Micro-T2I", text=TextConfig(encoder="clip", path=str(bare)))
    with pytest.raises(ConfigError, match=r"holds no tokenizer\.json"):
        resolve_text(cfg, None)
    missing = TextConfig(encoder="t5", path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"model.text.path=.*nope' holds no config.json"):
        resolve_text(model_config("JiT-Micro-T2I", text=missing), dataset=None)
    path = _save("t5", tmp_path / "t5")
    state = dict(__import__("safetensors.torch").torch.load_file(path / "model.safetensors"))
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    cfg = resolve_text(
        model_config("JiT-Micro-T2I", text=TextConfig(encoder="t5", path=str(path))), None
    )
    with pytest.raises(ConfigError, match="only as safetensors"):
        build_network(cfg)
