"""The compositional score on ``shapes``: the attribute probe judges real images well, the
score of real images that match their prompts is the probe's accuracy, images with wrong
attributes score low, and everything is seeded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from denoiselab.data import DataConfig
from denoiselab.data.shapes import render
from denoiselab.metrics.attribute_probe import (
    AttributeProbeConfig,
    attribute_probe_path,
    load_attribute_probe,
)
from denoiselab.metrics.compositional import (
    compositional_score,
    real_images,
    shapes_prompts,
)
from denoiselab.metrics.evaluate import batch_seed
from denoiselab.metrics.images import to_uint8

HOLDOUT = ("red triangle", "blue circle", "yellow star")
DATA = DataConfig(difficulty="easy", holdout_pairs=HOLDOUT)
SMALL = AttributeProbeConfig(steps=300, num_train=2000, num_val=500)  # ~15 CPU-seconds


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("denoiselab-cache")


@pytest.fixture(scope="module")
def probe(cache):
    return load_attribute_probe(DATA, SMALL, cache_dir=cache)


@pytest.fixture(scope="module")
def prompts():
    return shapes_prompts(DATA, 160, seed=1)


def _lookup(prompts, image_size=32, edit=None):
    """A 'generator' that renders the scene behind each prompt (optionally edited); prompts
    with the same text name the same attributes, so which of their scenes it draws is moot."""
    scenes = {p.prompt: p.spec for p in prompts}

    def generate(texts: list[str], seed: int) -> torch.Tensor:
        specs = [scenes[t] if edit is None else edit(scenes[t]) for t in texts]
        x = torch.stack([torch.from_numpy(render(s, image_size, 3) * 2 - 1) for s in specs])
        return to_uint8(x)

    return generate


def test_probe_judges_real_images(probe):
    acc = probe.meta["val_accuracy"]
    assert set(acc) == {"shape", "colour", "size", "background", "texture"}
    assert min(acc["shape"], acc["colour"], acc["background"]) >= 0.95, acc
    assert acc["texture"] >= 0.9 and acc["size"] >= 0.6, acc  # size chance is 1/3
    assert probe.names["shape"] == ["circle", "square", "triangle", "star", "cross"]


def test_prompt_set_is_seeded_and_asks_for_unseen_pairs(prompts):
    again, other = shapes_prompts(DATA, 160, seed=1), shapes_prompts(DATA, 160, seed=2)
    assert [p.prompt for p in again] == [p.prompt for p in prompts]
    assert [p.attributes for p in again] == [p.attributes for p in prompts]
    assert [p.prompt for p in other] != [p.prompt for p in prompts]
    unseen = [p for p in prompts if p.unseen]
    assert 75 <= len(unseen) <= 90  # half are forced, a few more drawn by chance
    asked = {(p.spec.fg, p.spec.shape) for p in unseen}
    assert asked == {tuple(pair.split()) for pair in HOLDOUT}
    for p in prompts:  # the prompt names what the attributes say
        assert p.spec.fg in p.prompt and p.spec.shape in p.prompt and p.spec.bg in p.prompt
        assert p.spec.fg != p.spec.bg
    plain = shapes_prompts(dataclasses.replace(DATA, holdout_pairs=None), 40, seed=1)
    assert not any(p.unseen for p in plain)


def test_real_images_score_the_probe_accuracy(probe, prompts):
    result = compositional_score(_lookup(prompts), prompts, probe=probe, batch=48, seed=0)
    acc, val = result["accuracy"], probe.meta["val_accuracy"]
    for name in acc:
        assert abs(acc[name] - val[name]) < 0.12, (name, acc[name], val[name])
    assert result["all_correct"] > 0.85 and result["judged"] == [
        "shape", "colour", "background", "texture",
    ]  # fmt: skip
    assert result["unseen"]["all_correct"] > 0.85  # the judge knows the held-out pairs
    assert result["num_unseen"] == sum(p.unseen for p in prompts)
    assert result["probe_real_accuracy"] == val
    rendered = [torch.from_numpy(render(p.spec, 32, 3) * 2 - 1) for p in prompts[:48]]
    assert torch.equal(real_images(prompts[:48], 32), to_uint8(torch.stack(rendered)))


def test_wrong_attributes_score_low(probe, prompts):
    """Swapping foreground and background colours (a binding error) keeps the shape right
    and makes both colours wrong; another prompt's scene makes everything near chance."""
    swapped = compositional_score(
        _lookup(
            prompts,
            edit=lambda s: dataclasses.replace(
                s, fg=s.bg, bg=s.fg, fg_rgb=s.bg_rgb, bg_rgb=s.fg_rgb
            ),
        ),
        prompts,
        probe=probe,
    )
    assert swapped["accuracy"]["shape"] > 0.9
    assert swapped["accuracy"]["colour"] < 0.2 and swapped["accuracy"]["background"] < 0.2
    assert swapped["all_correct"] < 0.1
    rolled = prompts[1:] + prompts[:1]
    other = {p.prompt: q.spec for p, q in zip(prompts, rolled, strict=True)}
    wrong_scenes = [dataclasses.replace(p, spec=other[p.prompt]) for p in prompts]
    shuffled = compositional_score(_lookup(wrong_scenes), prompts, probe=probe)
    assert shuffled["accuracy"]["shape"] < 0.45 and shuffled["all_correct"] < 0.1


def test_score_is_seeded_and_checks_its_input(probe, prompts):
    seen_seeds = []

    def noisy(texts, seed):
        seen_seeds.append(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.stack(
            [torch.from_numpy(render(p.spec, 32, 3) * 2 - 1) for p in prompts[: len(texts)]]
        )
        return to_uint8(x + 0.6 * torch.randn(x.shape, generator=g))

    a = compositional_score(noisy, prompts[:64], probe=probe, batch=32, seed=5)
    b = compositional_score(noisy, prompts[:64], probe=probe, batch=32, seed=5)
    assert a["accuracy"] == b["accuracy"] and a["batch_seeds"] == [batch_seed(5, i) for i in (0, 1)]
    assert seen_seeds[:2] == seen_seeds[2:4] == a["batch_seeds"]
    named = [
        (p.prompt, {k: probe.names[k][v] for k, v in p.attributes.items()}) for p in prompts[:64]
    ]
    by_name = compositional_score(noisy, named, probe=probe, batch=32, seed=5)
    assert by_name["accuracy"] == a["accuracy"] and by_name["num_unseen"] == 0
    with pytest.raises(ValueError, match=r"colour='mauve' in prompt 'x'; valid: \['red'"):
        compositional_score(noisy, [("x", {"colour": "mauve"})], probe=probe)
    with pytest.raises(ValueError, match=r"attributes \['mood'\] are not judged"):
        compositional_score(noisy, prompts[:4], probe=probe, judged=("mood",))
    with pytest.raises(ValueError, match=r"returned 2 images for 4 prompts"):
        compositional_score(lambda t, s: noisy(t, s)[:2], prompts[:4], probe=probe)
    with pytest.raises(ValueError, match=r"needs data.name='shapes' with channels=3"):
        shapes_prompts(DataConfig(name="digits"), 4)
    with pytest.raises(ValueError, match=r"channels=1"):
        load_attribute_probe(DataConfig(channels=1))


def test_probe_is_cached_by_content_hash(probe, cache, monkeypatch):
    path = attribute_probe_path(DATA, SMALL, cache)
    assert path.is_file() and path.parent.name == "probes" and path.suffix == ".safetensors"
    monkeypatch.setattr(
        "denoiselab.metrics.attribute_probe.fit_attribute_probe",
        lambda *a: pytest.fail("retrained"),
    )
    again = load_attribute_probe(DATA, SMALL, cache_dir=cache)
    images = real_images(shapes_prompts(DATA, 8), 32)
    for k, v in again.predict(images).items():
        assert torch.equal(v, probe.predict(images)[k])
    assert again.meta["val_accuracy"] == probe.meta["val_accuracy"]
    # The holdout changes the generator's data, not the judge's: same key.
    assert attribute_probe_path(dataclasses.replace(DATA, holdout_pairs=None), SMALL, cache) == path
    assert attribute_probe_path(DataConfig(difficulty="hard"), SMALL, cache) != path
    assert attribute_probe_path(DATA, dataclasses.replace(SMALL, steps=301), cache) != path
