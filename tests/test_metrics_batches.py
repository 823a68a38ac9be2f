"""The seeded batch loop every sample-scoring metric runs (``metrics.batches.run_batches``):
batches, seeds and order in one process, named errors, and — with two gloo ranks — each rank
generating only its share while every rank gets the one-process result, for the loop itself,
CLIPScore (a tiny random CLIP) and the compositional score (whose probe rank 0 trains into
the cache first)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from denoiselab.data import DataConfig
from denoiselab.metrics.attribute_probe import AttributeProbeConfig
from denoiselab.metrics.batches import batch_seed, run_batches
from denoiselab.metrics.compositional import compositional_score, shapes_prompts

from .test_terms import _free_port

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
SHAPES = DataConfig(difficulty="easy")
PROBE = AttributeProbeConfig(steps=30, num_train=256, num_val=64, batch=32)
PROMPT_TEXTS = ["a red circle", "a blue square", "a green star", "a small yellow cross",
                "a triangle on stripes", "two words", "a big red star"]  # fmt: skip


def _images_of(seed: int, n: int, size: int = 16) -> torch.Tensor:
    """Images that depend on the batch seed only (what a seeded sampler returns)."""
    g = torch.Generator().manual_seed(seed % (2**31))
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _loop(log: list[tuple[int, int, int]]) -> object:
    """``run_batches`` over 10 items, batch 4, seed 5, scoring each image's mean level."""

    def generate(start: int, stop: int, seed: int) -> torch.Tensor:
        log.append((start, stop, seed))
        return _images_of(seed, stop - start)

    def score(images: torch.Tensor, start: int, stop: int) -> tuple[list[int], torch.Tensor]:
        return list(range(start, stop)), images.float().mean((1, 2, 3))

    return run_batches(generate, score, 10, 4, 5, "labels")


def test_batches_seeds_and_order_in_one_process():
    log: list[tuple[int, int, int]] = []
    run = _loop(log)
    seeds = [batch_seed(5, i) for i in range(3)]
    assert log == [(0, 4, seeds[0]), (4, 8, seeds[1]), (8, 10, seeds[2])]
    assert run.seeds == seeds and run.world == 1 and run.image_shape == [3, 16, 16]
    assert [r[0] for r in run.results] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    want = torch.cat([_images_of(s, n).float().mean((1, 2, 3)) for s, n in zip(seeds, (4, 4, 2))])
    assert torch.equal(torch.cat([r[1] for r in run.results]), want)
    assert len({*seeds, batch_seed(6, 0)}) == 4  # distinct per batch and per evaluation seed


def test_batches_name_bad_input():
    with pytest.raises(ValueError, match=r"generate returned 3 images for 4 prompts"):
        run_batches(lambda a, b, s: _images_of(s, 3), lambda x, a, b: 0, 8, 4, 0, "prompts")
    with pytest.raises(ValueError, match=r"need at least one of the labels \(got 0\)"):
        run_batches(lambda a, b, s: _images_of(s, b - a), lambda x, a, b: 0, 0, 4, 0, "labels")
    with pytest.raises(ValueError, match=r"batch >= 1 \(got 0\)"):
        run_batches(lambda a, b, s: _images_of(s, b - a), lambda x, a, b: 0, 4, 0, 0)
    with pytest.raises(TypeError, match=r"uint8"):  # float images are refused, not rescaled
        run_batches(lambda a, b, s: torch.zeros(b - a, 3, 8, 8), lambda x, a, b: 0, 4, 4, 0)


def _shapes_generate(prompts: list[str], seed: int) -> torch.Tensor:
    """Rendered scenes of the prompts (a perfect 'model'), varied by the batch seed."""
    from denoiselab.data.shapes import render

    scenes = {p.prompt: p.spec for p in shapes_prompts(SHAPES, 24, seed=2)}
    x = torch.stack([torch.from_numpy(render(scenes[t], 32, 3) * 2 - 1) for t in prompts])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed % (2**31)))
    return ((x + 0.3 * noise).clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)


def _scores(clip_dir: str | None, cache: str) -> dict[str, object]:
    """The loop, CLIPScore and the compositional score, as each rank (or one process) sees them."""
    log: list[tuple[int, int, int]] = []
    run = _loop(log)
    out: dict[str, object] = {
        "generated": [start for start, _, _ in log],
        "loop": [r[1].tolist() for r in run.results],
        "loop_world": run.world,
    }
    if clip_dir is not None:
        from denoiselab.metrics.clipscore import clip_score, load_clip_scorer

        def generate(prompts: list[str], seed: int) -> torch.Tensor:
            return _images_of(seed, len(prompts))

        got = clip_score(generate, PROMPT_TEXTS, load_clip_scorer(clip_dir), batch=3, seed=1)
        out["clip"] = got["metrics"]
        out["clip_world"] = got["world_size"]
    prompts = shapes_prompts(SHAPES, 24, seed=2)
    comp = compositional_score(_shapes_generate, prompts, dataset_cfg=SHAPES, probe_config=PROBE,
                               batch=5, seed=3, cache_dir=cache)  # fmt: skip
    out["compositional"] = {"accuracy": comp["accuracy"], "all_correct": comp["all_correct"]}
    out["compositional_world"] = comp["world_size"]
    return out


def _rank(rank: int, port: int, clip_dir: str | None, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from denoiselab.metrics import attribute_probe
    from denoiselab.train.distributed import end_process

    fit = attribute_probe.fit_attribute_probe

    def noted_fit(*args, **kwargs):  # which rank trained the probe
        Path(out, f"fit{rank}").touch()
        return fit(*args, **kwargs)

    attribute_probe.fit_attribute_probe = noted_fit

    try:
        Path(out, f"rank{rank}.json").write_text(json.dumps(_scores(clip_dir, cache)))
    finally:
        torch.distributed.destroy_process_group()
    end_process(0)  # a clean exit of a gloo process (see its docstring)


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_share_the_batches_and_get_the_one_process_result(tmp_path):
    clip_dir = None
    if HAS_TRANSFORMERS:
        from .test_metrics_clipscore import _save_tiny_clip

        clip_dir = str(tmp_path / "clip")
        _save_tiny_clip(clip_dir)
    cache = tmp_path / "cache"  # empty: rank 0 trains the probe, rank 1 reads it
    torch.multiprocessing.spawn(_rank, args=(_free_port(), clip_dir, str(cache), str(tmp_path)),
                                nprocs=2, join=True)  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["generated"] == [0, 8] and ranks[1]["generated"] == [4]  # i ≡ rank (mod 2)
    one = _scores(clip_dir, str(cache))  # the probe is cached now: the same judge
    assert one["generated"] == [0, 4, 8] and one["loop_world"] == 1
    for got in ranks:
        assert got["loop_world"] == got["compositional_world"] == 2
        assert got["loop"] == one["loop"]  # exact: the same images in the same order
        assert got["compositional"] == one["compositional"]
        if clip_dir is not None:
            assert got["clip_world"] == 2
            assert got["clip"] == pytest.approx(one["clip"], rel=1e-6, abs=1e-6)
    assert len(list(cache.rglob("*.safetensors"))) == 1  # one probe,
    assert [p.name for p in tmp_path.glob("fit*")] == ["fit0"]  # trained by rank 0 alone
