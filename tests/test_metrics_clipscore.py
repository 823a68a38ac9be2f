"""CLIPScore: a tiny random ``CLIPModel`` with a byte-level CLIP tokenizer, saved as safetensors
and loaded through the real loader, against the formula computed here with the transformers
model itself; ``denoiselab eval --metrics clipscore`` end to end on a tiny text run; the
registry metrics on the same run; named errors for bad directories and runs."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from denoiselab.metrics import MissingExtractorError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers ([eval] extra)"
)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
SIZE = 16  # the tiny vision tower's image_size (the tiny text runs draw 16 px images)


def _save_tiny_clip(path, *, max_len: int = 160):
    """A random CLIPModel (both towers, projection 16) and a merge-free byte-level CLIP BPE
    tokenizer (every character a token), saved as a Hugging Face directory."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": 16}  # fmt: skip
    text = {**tower, "vocab_size": len(vocab), "max_position_embeddings": max_len,
            "bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1,
            "pad_token_id": len(vocab) - 1}  # fmt: skip
    config = CLIPConfig(
        text_config=text,
        vision_config={**tower, "image_size": SIZE, "patch_size": 4},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[]).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    return path, _save_tiny_clip(path)


def _reference_cosines(model, path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(E_img, E_txt) for every (image, prompt) pair ``[n_images, n_prompts]``, through the
    transformers model's own forward (logits / logit scale), PIL bicubic resizing."""
    from transformers import AutoTokenizer

    pixels = []
    for im in images.permute(0, 2, 3, 1).numpy():
        resized = np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BICUBIC), np.float64)
        pixels.append((resized / 255.0 - CLIP_MEAN) / CLIP_STD)
    pixels = torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).float()
    tokens = AutoTokenizer.from_pretrained(path)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels)
    return (out.logits_per_image / model.logit_scale.exp()).double()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


PROMPTS = ["a red circle", "a small blue square on a striped background", "a green star",
           "a big yellow triangle", "a circle", "two words"]  # fmt: skip


def test_clipscore_values_closed_form():
    """cos = 1/√2 and −1: Hessel clamps the negative pair at 0, the raw mean keeps it."""
    from denoiselab.metrics.clipscore import clipscore_values

    image = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    text = torch.tensor([[2.0, 2.0], [-0.5, 0.0]])
    got = clipscore_values(image, text)
    assert got["clipscore"] == pytest.approx(2.5 * (2**-0.5 + 0) / 2, rel=1e-12)
    assert got["clipscore_cos100"] == pytest.approx(100 * (2**-0.5 - 1) / 2, rel=1e-12)
    with pytest.raises(ValueError, match=r"must both be \[n, D\]"):
        clipscore_values(image, text[:1])


def test_clipscore_matches_the_formula_on_the_transformers_model(tiny_clip):
    """Hessel's 2.5·mean max(cos, 0) and 100·mean cos of each image with its own prompt,
    batched over uneven batches; images 24 px resized to the tower's 16."""
    from denoiselab.metrics.clipscore import clip_score, load_clip_scorer

    path, model = tiny_clip
    images = _images(len(PROMPTS), 24)
    cos = _reference_cosines(model, path, images, PROMPTS).diagonal()

    def generate(prompts, seed):
        return images[[PROMPTS.index(p) for p in prompts]]

    got = clip_score(generate, PROMPTS, load_clip_scorer(path), batch=4, seed=3)
    want = {
        "clipscore": 2.5 * cos.clamp(min=0).mean().item(),
        "clipscore_cos100": 100 * cos.mean().item(),
    }
    assert got["metrics"] == pytest.approx(want, rel=1e-3, abs=1e-3)  # PIL within 1 level
    assert got["num"] == 6 and len(got["batch_seeds"]) == 2 and got["truncated_prompts"] == 0


def test_clipscore_pairs_each_image_with_its_own_prompt(tiny_clip):
    """Shuffled prompts give the mean of the permuted cosine pairs, not the matched score."""
    from denoiselab.metrics.clipscore import clip_score, load_clip_scorer

    path, model = tiny_clip
    images = _images(len(PROMPTS), SIZE, seed=1)
    full = _reference_cosines(model, path, images, PROMPTS)
    scorer = load_clip_scorer(path)
    shift = PROMPTS[1:] + PROMPTS[:1]  # image i with prompt i + 1
    matched = clip_score(lambda p, s: images[: len(p)], PROMPTS, scorer, batch=8)
    shifted = clip_score(lambda p, s: images[: len(p)], shift, scorer, batch=8)
    rolled = full[torch.arange(6), (torch.arange(6) + 1) % 6]
    assert shifted["metrics"]["clipscore_cos100"] == pytest.approx(
        100 * rolled.mean().item(), abs=2e-3
    )
    assert matched["metrics"]["clipscore_cos100"] == pytest.approx(
        100 * full.diagonal().mean().item(), abs=2e-3
    )
    assert (
        abs(matched["metrics"]["clipscore_cos100"] - shifted["metrics"]["clipscore_cos100"]) > 0.5
    )


def test_long_prompts_are_truncated_with_a_warning(tmp_path):
    from denoiselab.metrics.clipscore import load_clip_scorer

    _save_tiny_clip(tmp_path / "c", max_len=12)
    scorer = load_clip_scorer(tmp_path / "c")
    with pytest.warns(UserWarning, match="1 prompt.*12 tokens were truncated"):
        emb = scorer.texts(["a red circle on a blue background", "a star"])
    assert emb.shape == (2, 16) and scorer.truncated == 1


def test_clip_directory_errors_name_the_flag_and_what_is_needed(tmp_path, tiny_clip):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from denoiselab.metrics.clipscore import load_clip_scorer

    with pytest.raises(MissingExtractorError, match="clipscore needs --clip DIR"):
        load_clip_scorer(None)
    with pytest.raises(MissingExtractorError, match=r"--clip '.*nowhere': no config\.json"):
        load_clip_scorer(tmp_path / "nowhere")
    vision = tmp_path / "vision"  # a CMMD-only directory: one tower
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)).save_pretrained(vision)  # fmt: skip
    with pytest.raises(
        MissingExtractorError, match="'clip_vision_model' model; clipscore needs both"
    ):
        load_clip_scorer(vision)
    _, model = tiny_clip
    pickled = tmp_path / "pickled"  # the same model as a pytorch_model.bin: refused
    pickled.mkdir()  # transformers 5 writes safetensors only: write the pickle by hand
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(MissingExtractorError, match="only as safetensors"):
        load_clip_scorer(pickled)
    no_tokenizer = tmp_path / "no_tok"
    model.save_pretrained(no_tokenizer, safe_serialization=True)
    with pytest.raises(MissingExtractorError, match="no usable CLIP tokenizer"):
        load_clip_scorer(no_tokenizer)


def test_eval_clipscore_and_registry_metrics_on_a_text_run(tmp_path, tiny_clip, capsys):
    """``denoiselab eval --metrics clipscore,fd_probe,acc_probe,cmmd`` on a text run: the
    clipscore equals the formula on the run's own prompted samples (held-out shapes prompts,
    the eval's batch seeds) scored here by the transformers model; the registry metrics are
    there; --prompts FILE replaces the prompts; a class run is a named error (exit 2)."""
    from denoiselab.cli import main
    from denoiselab.metrics import batch_seed, shapes_prompts, to_uint8
    from denoiselab.train.build import restore
    from denoiselab.train.loop import train

    from .test_text_train import text_cfg
    from .test_train import tiny

    path, model = tiny_clip
    run = train(text_cfg(), tmp_path / "run", quiet=True)
    argv = ["eval", str(run), "--metrics", "clipscore,fd_probe,acc_probe,cmmd", "--clip", str(path),
            "--num", "6", "--batch", "4", "--steps", "2", "--probe-steps", "10", "--ema", "0.99",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert {"fd_probe", "acc_probe", "cmmd", "clipscore", "clipscore_cos100"} <= set(got["metrics"])
    assert got["prompts"].startswith("captions of the data")  # the registry generator's
    r = restore(run, ema=0.99)
    prompts = [p.prompt for p in shapes_prompts(r.cfg.data, 6, 0)]
    images = torch.cat([
        to_uint8(r.sample_prompts(prompts[i : i + 4], batch_seed(0, k), **r.settings(2)))
        for k, i in enumerate((0, 4))
    ])  # fmt: skip
    cos = _reference_cosines(model, path, images, prompts).diagonal()
    assert got["metrics"]["clipscore"] == pytest.approx(
        2.5 * cos.clamp(min=0).mean().item(), abs=2e-3
    )
    assert got["metrics"]["clipscore_cos100"] == pytest.approx(100 * cos.mean().item(), abs=0.2)

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\na blue square on a striped green background\n")
    assert (
        main(
            [
                *argv[:3],
                "clipscore",
                *argv[4:-1],
                str(tmp_path / "p"),
                "--prompts",
                str(prompts_file),
            ]
        )
        == 0
    )
    by_file = json.loads((tmp_path / "p" / "eval.json").read_text())
    assert by_file["clipscore"]["prompts"] == f"file {prompts_file}"
    assert by_file["metrics"]["clipscore"] != got["metrics"]["clipscore"]
    capsys.readouterr()

    class_run = train(tiny(), tmp_path / "class", quiet=True)
    assert main([argv[0], str(class_run), *argv[2:-1], str(tmp_path / "c")]) == 2
    assert "'clipscore' scores samples against their prompts" in capsys.readouterr().err
    bad = [*argv[:-1], str(tmp_path / "n")]
    bad[bad.index("--clip") + 1] = str(tmp_path / "none")
    assert main(bad) == 2
    assert "--clip '" in capsys.readouterr().err and not (tmp_path / "n").exists()
    with pytest.raises(SystemExit) as stop:  # --prompts belong to clipscore
        main(
            [
                "eval",
                str(run),
                "--metrics",
                "fd_probe",
                "--prompts",
                str(prompts_file),
                "--out",
                "x",
            ]
        )
    assert stop.value.code == 2 and "add clipscore to --metrics" in capsys.readouterr().err


def test_text_run_on_a_flat_imagefolder(tmp_path, tiny_clip, capsys):
    """A text run on one flat folder of captioned images (one class): clipscore is scored on
    the data's captions; acc_probe is a named error (no prompt has a class to check)."""
    from denoiselab.cli import main
    from denoiselab.train.loop import train

    from .test_text_train import text_cfg

    root = tmp_path / "pics"
    root.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    lines = []
    for k in range(12):
        name, rgb = list(colours.items())[k % 3]
        Image.new("RGB", (20, 20), rgb).save(root / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": f"a plain {name} square"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cfg = text_cfg(**{"data.name": "imagefolder", "data.root": str(root), "data.num_images": 12, "data.hflip": "false",
                      "duration_nimg": 16})  # fmt: skip
    run = train(cfg, tmp_path / "run", quiet=True)
    argv = ["eval", str(run), "--metrics", "clipscore", "--clip", str(tiny_clip[0]), "--num", "4",
            "--batch", "4", "--steps", "2", "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert got["clipscore"]["prompts"] == "captions of the data (seeded draw)"
    assert 0 <= got["metrics"]["clipscore"] <= 2.5
    capsys.readouterr()
    argv[3] = "fd_probe,acc_probe"
    assert main(argv) == 2
    assert "acc_probe: this text run's data (imagefolder) has 1 class" in capsys.readouterr().err


def test_prompt_generator_samples_a_batch_once_when_asked_to_remember() -> None:
    """compositional and clipscore on shapes score the same prompts with the same batch
    seeds: with ``remember`` the second metric reuses the first one's samples."""
    from denoiselab.evaluation_clip import prompt_generator

    calls = []

    class Run:  # a run whose sample_prompts prompt_generator calls
        def sample_prompts(self, prompts, seed, **settings):
            calls.append((tuple(prompts), seed, settings["cfg_scale"]))
            return torch.linspace(-1, 1, len(prompts) * 48).view(len(prompts), 3, 4, 4)

    own = {"steps": 2}
    once = prompt_generator(Run().sample_prompts, own, 2.0, remember=True)
    a, b = once(["x", "y"], 7), once(["x", "y"], 7)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and calls == [(("x", "y"), 7, 2.0)]
    once(["x", "y"], 8)  # another seed: drawn
    assert len(calls) == 2
    fresh = prompt_generator(Run().sample_prompts, own, 2.0)
    fresh(["x"], 1), fresh(["x"], 1)
    assert len(calls) == 4  # without remember every call samples


@pytest.fixture
def clip_loads(monkeypatch) -> list[str]:
    """The class names of every transformers model the metrics load, in order (the real
    ``load_pretrained`` still loads them)."""
    import denoiselab.metrics.clipscore as clipscore_module
    import denoiselab.metrics.extractors as extractors_module
    from denoiselab.encoders.hf import load_pretrained

    loads: list[str] = []

    def counting(model_path, class_name, *args, **kwargs):
        loads.append(class_name)
        return load_pretrained(model_path, class_name, *args, **kwargs)

    monkeypatch.setattr(extractors_module, "load_pretrained", counting)
    monkeypatch.setattr(clipscore_module, "load_pretrained", counting)
    return loads


def test_cmmd_and_clipscore_from_one_clip_load_the_weights_once(tmp_path, tiny_clip, clip_loads):
    """``eval --metrics cmmd,clipscore`` with one ``--clip``: the weights are read once (the
    whole CLIPModel; CMMD embeds with its vision tower) and both values, and CMMD's extractor
    record (a reference-cache key), are those of each metric computed alone."""
    from denoiselab.cli import main
    from denoiselab.metrics import load_clip, load_clip_scorer
    from denoiselab.train.loop import train

    from .test_text_train import text_cfg

    path, _ = tiny_clip
    images = _images(5, 20, seed=3)  # not the tower's size: the resize is part of the features
    shared = load_clip_scorer(path).image_embedder()
    assert torch.equal(shared(images), load_clip(path)(images))
    assert shared.preprocessing == load_clip(path).preprocessing

    loads = clip_loads  # each evaluation below starts its count afresh
    run = train(text_cfg(), tmp_path / "run", quiet=True)

    def evaluate(metrics: str) -> tuple[dict, list[str]]:
        loads.clear()
        out = tmp_path / metrics.replace(",", "_")
        argv = ["eval", str(run), "--metrics", metrics, "--clip", str(path), "--num", "6",
                "--batch", "4", "--steps", "2", "--ema", "0.99", "--cache-dir",
                str(out / "cache"), "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        return json.loads((out / "eval.json").read_text()), list(loads)

    cmmd, cmmd_loads = evaluate("cmmd")
    score, score_loads = evaluate("clipscore")
    both, both_loads = evaluate("cmmd,clipscore")
    assert cmmd_loads == ["CLIPVisionModelWithProjection"] and score_loads == ["CLIPModel"]
    assert both_loads == ["CLIPModel"]
    for key in ("cmmd", "cmmd_unbiased"):
        assert both["metrics"][key] == cmmd["metrics"][key]
    for key in ("clipscore", "clipscore_cos100"):
        assert both["metrics"][key] == score["metrics"][key]
    assert both["extractors"]["clip"] == cmmd["extractors"]["clip"]


def test_periodic_clipscore_of_a_text_run_equals_eval_of_its_checkpoint(
    tmp_path, tiny_clip, clip_loads
):
    """``eval.metrics: [clipscore, cmmd]`` with ``eval.clip`` during training: the run's eval
    row holds finite values equal to ``denoiselab eval`` of the checkpoint written at the same
    step (same EMA, prompts, sampler, samples and seed), and the CLIP is loaded once for the
    run's two evaluations."""
    import math

    from denoiselab.cli import main
    from denoiselab.train.loop import train
    from denoiselab.train.run import read_metrics

    from .test_text_train import text_cfg

    path, _ = tiny_clip
    loads = clip_loads
    cache = tmp_path / "cache"
    cfg = text_cfg(**{"eval.every_nimg": 32, "eval.metrics": "[clipscore, cmmd]", "eval.num": 6,
                      "eval.batch": 4, "eval.steps": 2, "eval.ema": 0.99, "eval.seed": 3,
                      "eval.clip": str(path), "eval.cache_dir": str(cache)})  # fmt: skip
    run = train(cfg, tmp_path / "run", quiet=True)
    assert loads == ["CLIPModel"]  # two evaluations (half-way and the end), one load
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "eval/clipscore" in r]
    assert [r["step"] for r in rows] == [cfg.steps() // 2, cfg.steps()]
    logged = rows[1]
    assert all(
        math.isfinite(logged[f"eval/{k}"]) for k in ("clipscore", "clipscore_cos100", "cmmd")
    )
    argv = ["eval", str(run), "--metrics", "clipscore,cmmd", "--clip", str(path), "--num", "6",
            "--batch", "4", "--steps", "2", "--ema", "0.99", "--seed", "3", "--cache-dir",
            str(cache), "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert got["step"] == logged["step"]
    for key in ("clipscore", "clipscore_cos100", "cmmd"):
        assert logged[f"eval/{key}"] == got["metrics"][key], key


def test_periodic_clipscore_config_errors_name_the_key(tmp_path, tiny_clip):
    """A class run listing clipscore is refused when the config is built; a text run's
    ``eval.clip`` that is missing, not a whole CLIP, or unset with nothing in the cache is a
    ConfigError before the first step (nothing written)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from denoiselab.config import ConfigError
    from denoiselab.train.loop import train

    from .test_text_train import text_cfg
    from .test_train import tiny

    refused = "'clipscore', which scores samples against their prompts: this is a class-conditional"
    with pytest.raises(ConfigError, match=refused):
        tiny(**{"eval.metrics": "[clipscore]"})
    with pytest.raises(ConfigError, match=r"eval.metrics has \['nope'\]; valid: .*clipscore"):
        text_cfg(**{"eval.metrics": "[nope]"})
    vision = tmp_path / "vision"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=8, intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)).save_pretrained(vision)  # fmt: skip
    base = {"eval.every_nimg": 32, "eval.metrics": "[clipscore]", "eval.cache_dir": str(tmp_path / "c")}  # fmt: skip
    need = "clipscore needs a local directory with a whole CLIP"
    cases = {
        str(tmp_path / "none"): rf"eval.clip '.*none': no config.json there; {need}",
        str(vision): r"eval.clip '.*vision' holds a 'clip_vision_model' model",
        None: r"'clipscore', which needs eval.clip: a local directory with a whole CLIP",
    }
    for clip, message in cases.items():
        cfg = text_cfg(**base, **({"eval.clip": clip} if clip else {}))
        out = tmp_path / f"run{len(clip or '')}"
        with pytest.raises(ConfigError, match=message):
            train(cfg, out, quiet=True)
        assert not out.exists()  # refused before the run folder, let alone a checkpoint
    # the cache's default place serves when eval.clip is unset
    import shutil

    shutil.copytree(tiny_clip[0], tmp_path / "c" / "extractors" / "clip-vit-large-patch14-336")
    from denoiselab.train.periodic import check_eval_ready

    check_eval_ready(text_cfg(**base))


def test_eval_text_metrics_sample_with_the_guidance_flags(tmp_path, tiny_clip, capsys):
    """``--guidance``/``--sparse-ratio`` reach the sampler of clipscore and compositional too
    (they reached only the registry metrics' sampler: eval.json said ``guidance: sparse``
    while clipscore was sampled with CFG). Sparse guidance on a run without token routing
    is the sampler's named error, so a flag that arrives turns a silent 0 into exit 2."""
    from denoiselab.cli import main
    from denoiselab.train.loop import train

    from .test_text_train import text_cfg

    run = train(text_cfg(duration_nimg=16), tmp_path / "run", quiet=True)
    argv = ["eval", str(run), "--metrics", "clipscore", "--clip", str(tiny_clip[0]), "--num",
            "2", "--batch", "2", "--steps", "1", "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 0  # CFG (the default) samples this run
    capsys.readouterr()
    assert main([*argv, "--guidance", "sparse"]) == 2
    assert "guidance 'sparse'" in capsys.readouterr().err
