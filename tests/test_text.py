"""Text conditioning: tokenizers, encoders on tiny local transformers models, the text
network (conditioning, masking, RoPE on image tokens only), caption dropout and CFG."""

from __future__ import annotations

import pytest
import torch

from denoiselab.models.registry import build_network, model_config
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.sampling.guidance import ClassifierFreeGuidance
from denoiselab.text import PAD, TextConfig, UnknownWordError, WordTokenizer, build_vocab

VOCAB, LONGEST = build_vocab(
    ["a small red circle on a plain blue background", "a large green star on a white background"]
)


def test_vocab_and_word_tokenizer_ids_padding_and_errors():
    assert tuple(sorted(set(VOCAB))) == VOCAB and "circle" in VOCAB and "," not in VOCAB
    assert LONGEST == 9
    tok = WordTokenizer(VOCAB, 6)
    ids = tok(["A small, RED circle.", ""])
    index = {w: i for i, w in enumerate(VOCAB)}
    assert ids.dtype == torch.long and ids.shape == (2, 6)
    assert ids[0].tolist() == [index[w] for w in ("a", "small", "red", "circle")] + [PAD, PAD]
    assert ids[1].tolist() == [PAD] * 6  # the empty prompt: all padding (unconditional)
    with pytest.raises(UnknownWordError, match=r"\['trinagle'\].*valid words: a, background"):
        tok(["a red trinagle"])
    with pytest.warns(UserWarning, match=r"prompt 'a small red circle on a plain blue' has 8 "
                      r"tokens but the text encoder takes at most max_len=6"):  # fmt: skip
        out = tok(["a small red circle on a plain blue"])
    assert out[0].tolist() == [index[w] for w in ["a", "small", "red", "circle", "on", "a"]]


def _net(mode: str = "joint", **overrides):
    text = TextConfig(mode=mode, vocab=VOCAB, max_len=LONGEST, dim=24)
    cfg = model_config("JiT-Micro-T2I", text=text, **overrides)
    torch.manual_seed(0)
    net = build_network(cfg)
    with torch.no_grad():  # leave the zero init (output 0, gates 0): every path must matter
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval(), WordTokenizer(VOCAB, LONGEST)


@pytest.mark.parametrize("mode", ["joint", "cross"])
def test_prompt_changes_the_output_and_padding_does_not(mode):
    net, tok = _net(mode)
    z, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7])
    ids = tok(["a small red circle", "a large green star on a white background"])
    other = tok(["a large blue circle", "a small green star on a plain background"])
    out = net(z, t, ids)
    assert out.shape == z.shape
    assert not torch.allclose(out, net(z, t, other), atol=1e-4)
    assert not torch.allclose(out, net(z, t, tok(["", ""])), atol=1e-4)
    # padding is masked: padded positions look up word 0 ("a"); changing its embedding
    # changes only a prompt that really holds "a"
    assert VOCAB[0] == "a"
    ids = tok(["small red circle", "a small red circle"])
    before = net(z, t, ids)
    with torch.no_grad():
        net.text.words.weight[0] += 1.0
    after = net(z, t, ids)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1], atol=1e-4)


def test_joint_rope_rotates_image_tokens_only_and_in_context_is_refused():
    net, _ = _net("joint")
    rope = net.rope_text
    n_text = net.text_len
    assert torch.equal(rope.cos[:n_text], torch.ones_like(rope.cos[:n_text]))
    assert torch.equal(rope.sin[:n_text], torch.zeros_like(rope.sin[:n_text]))
    assert torch.equal(rope.cos[n_text:], net.rope.cos)  # the image tokens: the usual RoPE
    with pytest.raises(ValueError, match="in_context_len=4 must be 0 with text conditioning"):
        model_config("JiT-Micro-T2I", in_context_len=4)


def test_text_net_state_holds_the_text_projection_and_checks_its_input():
    net, _ = _net("cross")
    keys = net.state_dict().keys()
    assert {"cond_embedder.proj.weight", "cond_embedder.words.weight", "cond_embedder.null"} <= set(
        keys
    )
    assert any(k.startswith("blocks.0.cross.") for k in keys)
    with pytest.raises(ValueError, match=r"token ids int64 \[B, 9\].*got torch.int64 \[2\]"):
        net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2]))


@pytest.mark.parametrize(
    "text, message",
    [
        ({"mode": "both"}, "model.text.mode='both'; valid: joint, cross"),
        ({"encoder": "bert"}, "model.text.encoder='bert'; valid: words, t5, clip, auto"),
        ({"encoder": "t5"}, "model.text.path is required for model.text.encoder='t5'"),
        ({"path": "/x"}, "model.text.path='/x' is given but model.text.encoder='words'"),
    ],
)
def test_bad_text_config_is_named(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_config("JiT-Micro-T2I", text=text)


def test_caption_dropout_is_exactly_the_unconditional_input():
    """Dropped captions become all-PAD rows — the empty prompt, which is also what CFG feeds
    the unconditional branch — drawn by the same coin flips as class dropout."""
    obj = DenoisingObjective(ObjectiveConfig(label_drop=0.5, noise_scale=1.0), num_classes=5)
    tok = WordTokenizer(VOCAB, LONGEST)
    ids = tok(["a small red circle"] * 16)
    x = torch.randn(16, 3, 16, 16)
    _, _, dropped = obj.draw(x, ids, torch.Generator().manual_seed(3))
    _, _, labels = obj.draw(x, torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(3))
    was_dropped = labels == 5  # the class run's dropout decisions, same generator
    assert 0 < int(was_dropped.sum()) < 16
    empty = tok([""])[0]
    for row in range(16):
        assert torch.equal(dropped[row], empty if was_dropped[row] else ids[row])
    net, _ = _net("joint")
    z, t = torch.randn(16, 3, 16, 16), torch.rand(16)
    cfg_null = ClassifierFreeGuidance(net, lambda o, z, t: o, ids, PAD, 2.0)._y_null
    keep = was_dropped.nonzero().flatten()
    torch.testing.assert_close(
        net(z[keep], t[keep], dropped[keep]), net(z[keep], t[keep], cfg_null[keep]), rtol=0, atol=0
    )


def test_cfg_with_a_negative_prompt_guides_away_from_it():
    net, tok = _net("joint")
    ids, neg = tok(["a small red circle"] * 2), tok(["a large green star"] * 2)
    z = torch.randn(2, 3, 16, 16)
    fn = ClassifierFreeGuidance(net, lambda o, z, t: o, ids, PAD, 3.0, (0.0, 1.0), y_null=neg)
    t = torch.full((2,), 0.5)
    expect = net(z, t, neg) + 3.0 * (net(z, t, ids) - net(z, t, neg))
    torch.testing.assert_close(fn(z, 0.5), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        ClassifierFreeGuidance(net, lambda o, z, t: o, ids, PAD, 3.0, y_null=neg[:1])
