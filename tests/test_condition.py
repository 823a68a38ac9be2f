"""The null condition (``models.condition``): label dropout and CFG get their unconditional input
from one condition kind, chosen where the run is built, for each kind of condition — class
labels, token ids, cached text embeddings — and an unsupported condition is a named error."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from denoiselab.models.condition import ByShape, ClassLabels, TextPrompts
from denoiselab.models.registry import build_network, model_config
from denoiselab.objectives import DenoisingObjective
from denoiselab.sampling.guidance import ClassifierFreeGuidance
from denoiselab.text import TextConfig, WordTokenizer, tokenizer_for
from denoiselab.train.build import build_objective, run_sampler

from .test_text import LONGEST, VOCAB
from .test_text_cache import resolved, t5, t5_cfg  # noqa: F401  (t5: a tiny random T5 encoder)
from .test_train import tiny

B = 12
PROMPTS = ["a small red circle", "a large green star on a white background", "a circle"] * 4


def _run_cfg():
    cfg = tiny()
    return replace(cfg, objective=replace(cfg.objective, noise_scale=1.0, label_drop=0.5))


def _objective_and_cfg_nulls(mc, y_train, y_sample):
    """The rows label dropout replaced (``dropped``, their new value) and the unconditional
    input CFG handed the network for ``y_sample``, both through the run's real build path."""
    cfg = _run_cfg()
    objective = build_objective(cfg, mc)
    x = torch.randn(B, mc.in_channels, mc.image_size, mc.image_size)
    _, _, y = objective.draw(x, y_train, torch.Generator().manual_seed(3))
    dropped = (y != y_train).reshape(B, -1).any(dim=1)
    assert 0 < int(dropped.sum()) < B  # the coin flips drop some rows and keep others
    seen = []

    def net(z, t, y):  # records what the sampler feeds the network
        seen.append(y.clone())
        return torch.zeros_like(z)

    sampler = run_sampler(net, objective, cfg, mc, decode=lambda v: v, device="cpu")
    sampler(y_sample, seed=0, steps=1, solver="euler", cfg_scale=2.0, interval=(0.0, 1.0))
    (both,) = seen  # one batched call: [conditional; unconditional]
    assert torch.equal(both[:B], y_sample)
    return dropped, y[dropped], both[B:][dropped]


def _embeddings(net, ids):
    """The cached form of ids (``text.embed_cache``): encoder tokens, then the mask channel."""
    tokens, mask = net.text.encode(ids)
    return torch.cat([tokens, mask.float()[..., None]], dim=-1)


@pytest.mark.parametrize("kind", ["class labels", "token ids", "cached embeddings"])
def test_label_dropout_and_cfg_agree_on_the_null(kind, request):
    """The null that label dropout trains is the unconditional input that CFG subtracts: the
    same labels (class labels, token ids), or — a run trained on cached embeddings, sampled
    from prompts — the cached form of CFG's empty prompt, so the network sees the same input."""
    if kind == "class labels":
        mc = model_config("JiT-Micro", num_classes=10, image_size=16)
        y_sample = torch.arange(B) % 10
    else:
        if kind == "token ids":
            text = TextConfig(vocab=VOCAB, max_len=LONGEST, dim=24)
            mc = model_config("JiT-Micro-T2I", text=text, image_size=16)
        else:  # a run on cached embeddings of a frozen encoder, sampled from prompts
            mc = resolved(t5_cfg(request.getfixturevalue("t5")))[1]
        y_sample = tokenizer_for(mc.text)(PROMPTS)
    torch.manual_seed(0)
    net = build_network(mc).eval()  # a text net holds the frozen encoder of a cache run
    as_trained = (lambda y: _embeddings(net, y)) if kind == "cached embeddings" else (lambda y: y)
    y_train = as_trained(y_sample)
    assert y_train.dim() == {"class labels": 1, "token ids": 2, "cached embeddings": 3}[kind]
    dropped, drop_null, cfg_null = _objective_and_cfg_nulls(mc, y_train, y_sample)
    assert torch.equal(drop_null, as_trained(cfg_null))
    n = int(dropped.sum())
    z, t = torch.randn(n, mc.in_channels, mc.image_size, mc.image_size), torch.rand(n)
    with torch.no_grad():
        assert torch.equal(net(z, t, drop_null), net(z, t, cfg_null))


def test_the_null_of_each_kind():
    """Written out: the null class, all padding, zeros — shaped and typed like ``y``."""
    labels = torch.tensor([0, 3, 9])
    assert ClassLabels(10).null_like(labels).tolist() == [10, 10, 10]
    ids = WordTokenizer(VOCAB, LONGEST)(["a small red circle", ""])
    assert TextPrompts(LONGEST, 24).null_like(ids).tolist() == [[-1] * LONGEST] * 2
    emb = torch.randn(2, LONGEST, 25, dtype=torch.bfloat16)
    null = TextPrompts(LONGEST, 24).null_like(emb)
    assert null.dtype == torch.bfloat16 and null.shape == emb.shape and not null.any()
    # told by shape, without a network config: the same written-out values
    assert ByShape(10).null_like(labels).tolist() == [10, 10, 10]
    assert ByShape(10).null_like(ids).tolist() == [[-1] * LONGEST] * 2
    assert not ByShape(10).null_like(emb).any()


def _message(*valid: str) -> str:
    return ".*".join(re.escape(v) for v in valid)


def test_an_unsupported_condition_is_a_named_error():
    """Label dropout and CFG refuse a condition their kind has no null for, naming its shape and
    dtype and what would be valid."""
    cfg = _run_cfg()
    x = torch.randn(4, 3, 16, 16)
    mc = model_config("JiT-Micro", num_classes=10, image_size=16)
    objective = build_objective(cfg, mc)
    with pytest.raises(ValueError, match=_message(
        "a condition y of shape [4, 6] (torch.int64) has no null input",
        "valid: class labels int64 [B] (null: class 10)",
    )):  # fmt: skip
        objective.draw(x, torch.zeros(4, 6, dtype=torch.long), None)
    text = model_config("JiT-Micro-T2I", image_size=16,
                        text=TextConfig(vocab=VOCAB, max_len=LONGEST, dim=24))  # fmt: skip
    objective = build_objective(cfg, text)
    with pytest.raises(ValueError, match=_message(
        "shape [4, 5] (torch.int64)",
        f"valid: token ids int64 [B, {LONGEST}] (null: all PAD = -1, the empty prompt)",
        f"cached text embeddings float [B, {LONGEST}, 25] (null: zeros)",
    )):  # fmt: skip
        objective.draw(x, torch.zeros(4, 5, dtype=torch.long), None)
    # kind unknown (built from a class count alone): every form is named
    objective = DenoisingObjective(cfg.objective, 10)
    with pytest.raises(ValueError, match=_message(
        "shape [4, 2, 3, 5] (torch.float32)",
        "class labels int64 [B] (null: class 10); token ids int64 [B, L]",
        "cached text embeddings float [B, L, D + 1] (null: zeros)",
    )):  # fmt: skip
        objective.draw(x, torch.zeros(4, 2, 3, 5), None)
    # CFG asks the same kind
    with pytest.raises(ValueError, match=_message("shape [4] (torch.float32)", "class labels")):
        ClassifierFreeGuidance(
            lambda z, t, y: z, lambda o, z, t: o, torch.zeros(4), ClassLabels(10)
        )
