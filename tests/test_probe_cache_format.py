"""The class probe and the attribute probe share one cache-file code path and one training
recipe (``metrics.probe.cached_net`` / ``write_net_file`` / ``read_net_file``,
``metrics.probe_train.train_net``). Their files keep the layout the separate copies wrote
(the state dict as safetensors tensors, every metadata value JSON, same cache key), so a
probe cached before the two shared the code loads without retraining, and both ways."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

from denoiselab.data import DataConfig
from denoiselab.metrics.attribute_probe import (
    AttributeNet,
    AttributeProbeConfig,
    attribute_probe_path,
    load_attribute_probe,
)
from denoiselab.metrics.attribute_probe import _train as train_attributes
from denoiselab.metrics.probe import cached_net, load_probe, probe_path
from denoiselab.metrics.probe_train import ProbeConfig, ProbeNet, train_probe

DATA = DataConfig(name="shapes", image_size=16, difficulty="easy")
HEADS = {"shape": ["circle", "square"], "colour": ["red", "green", "blue"]}


def _old_layout(path, net, meta) -> None:
    """The file the pre-sharing code wrote, with the raw safetensors API."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    safetensors.torch.save_file(state, str(path), {k: json.dumps(v) for k, v in meta.items()})


def _raw(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    return safetensors.torch.load_file(str(path)), meta


def _random(net):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net.eval()


def _no_fit(*args, **kwargs):
    pytest.fail("a cached probe was retrained")


def test_a_class_probe_cached_in_the_old_layout_loads_without_retraining(tmp_path, monkeypatch):
    cfg = ProbeConfig(width=8)
    path = probe_path(DATA, cfg, tmp_path)
    net = _random(ProbeNet(5, 16, 8))
    meta = {"num_classes": 5, "image_size": 16, "config": {"width": 8}, "val_accuracy": 0.5,
            "key": path.stem.removeprefix("probe-"), "dataset": {"name": "shapes"}}  # fmt: skip
    _old_layout(path, net, meta)
    monkeypatch.setattr("denoiselab.metrics.probe.fit_probe", _no_fit)
    probe = load_probe(DATA, config=cfg, cache_dir=tmp_path)
    assert probe.meta == meta and probe.weights_id == meta["key"]
    for k, v in net.state_dict().items():
        assert torch.equal(probe.net.state_dict()[k], v), k
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        expected = net(images.float() / 127.5 - 1)[0]
    torch.testing.assert_close(probe(images), expected)


def test_an_attribute_probe_cached_in_the_old_layout_loads_without_retraining(
    tmp_path, monkeypatch
):
    cfg = AttributeProbeConfig(width=8, image_size=16)
    path = attribute_probe_path(DATA, cfg, tmp_path)
    net = _random(AttributeNet({k: len(v) for k, v in HEADS.items()}, 16, 8))
    meta = {"attribute_names": HEADS, "config": {"width": 8, "image_size": 16},
            "val_accuracy": {"shape": 1.0, "colour": 0.5},
            "key": path.stem.removeprefix("attributes-")}  # fmt: skip
    _old_layout(path, net, meta)
    monkeypatch.setattr("denoiselab.metrics.attribute_probe.fit_attribute_probe", _no_fit)
    probe = load_attribute_probe(DATA, cfg, cache_dir=tmp_path)
    assert probe.meta == meta and probe.names == HEADS and probe.weights_id == meta["key"]
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        logits = net(images.float() / 127.5 - 1)
    got = probe.predict(images)
    assert set(got) == set(HEADS)
    for k in HEADS:
        assert torch.equal(got[k], logits[k].argmax(1)), k


def test_files_written_now_have_the_old_layout(tmp_path):
    """What the shared writer puts on disk reads back with the raw API as the old reader did:
    the same tensors, every metadata value JSON, the key taken from the file name."""
    path = tmp_path / "probes" / "attributes-0123abcd.safetensors"
    net = _random(AttributeNet({k: len(v) for k, v in HEADS.items()}, 16, 8))
    meta = {"attribute_names": HEADS, "config": {"width": 8, "image_size": 16}}
    fitted = []
    built, loaded_meta = cached_net(path, lambda: (fitted.append(1), (net, meta))[1],
                                    lambda m: AttributeNet({k: len(v) for k, v in m["attribute_names"].items()}, 16, 8))  # fmt: skip
    state, raw_meta = _raw(path)
    assert raw_meta == loaded_meta == {**meta, "key": "0123abcd"} and fitted == [1]
    assert state.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v) and torch.equal(built.state_dict()[k], v), k
    assert not built.training and not any(p.requires_grad for p in built.parameters())
    cached_net(path, lambda: pytest.fail("refitted"), lambda m: built)  # present: read only


@pytest.mark.parametrize("kind", ["class", "attributes"])
def test_both_probes_train_through_one_seeded_recipe(kind):
    """Same seed, same weights whatever the global RNG; the global RNG is left as it was;
    another seed differs."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 16, 16, generator=g) * 2 - 1
    labels = {k: torch.randint(0, len(v), (24,), generator=g) for k, v in HEADS.items()}

    def train(seed):
        if kind == "class":
            cfg = ProbeConfig(width=8, steps=3, batch=8, seed=seed)
            return train_probe(x, labels["colour"], 3, cfg)
        cfg = AttributeProbeConfig(width=8, steps=3, batch=8, image_size=16, seed=seed)
        return train_attributes(x, labels, HEADS, cfg)

    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = train(0)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(8)  # another global state: the recipe's own seed decides, not this
    b, c = train(0), train(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
