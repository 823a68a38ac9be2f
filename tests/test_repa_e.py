"""REPA-E: the diffusion loss updates only the latent model (stop-gradient into the
autoencoder), the REPA loss updates both; the tuned autoencoder is a normal ``tiny``
autoencoder that ``cache-latents`` and ``train`` accept."""

from __future__ import annotations

import pytest
import torch

from denoiselab.config import from_dict
from denoiselab.latents import TinyAE, TinyAEConfig, load_autoencoder, save_tiny_ae
from denoiselab.latents.repa_e import REPAE, REPAEConfig, repa_e_main

TINY_SSL = {"patch": 4, "steps": 2, "num_train": 16, "num_val": 4, "batch": 8, "width": 16, "depth": 1,
            "heads": 2, "head_dim": 8}  # fmt: skip


def _setup(tmp_path, **fields) -> REPAE:
    torch.manual_seed(0)
    ae = save_tiny_ae(TinyAE(TinyAEConfig(widths=(8, 16))), tmp_path / "ae",
                      latent_mean=torch.zeros(4), latent_std=torch.ones(4), info={})  # fmt: skip
    raw = {
        "autoencoder": str(ae),
        "data": {"name": "shapes", "image_size": 16, "num_images": 32},
        "model": {"name": "JiT-Micro", "patch_size": 1, "bottleneck": None},
        "repa": {"weight": 0.5, "block": 1,
                 "teacher": {"offline": TINY_SSL, "cache_dir": str(tmp_path / "t")}},
        "steps": 2, "batch": 4, "stats_images": 8, **fields,
    }  # fmt: skip
    return REPAE(from_dict(REPAEConfig, raw))


def _reference_grads(run: REPAE, x, y, step, diffusion_into_ae: bool):
    """Written out: the denoiser's loss on detached latents; the autoencoder's loss without
    (or, to show the difference, with) the diffusion term."""
    cfg = run.cfg
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    mu, logvar = run.ae.moments(x)
    noise = torch.randn(mu.shape, generator=gen)
    recon = ((run.ae.decode(mu + (0.5 * logvar).exp() * noise) - x) ** 2).mean()
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
    z = (mu - run.mean) / run.std
    t, eps, yd = run.objective.draw(z, y, gen)
    extras = {"teacher": run.term.teacher(x)}
    det = run.objective.terms(run.net, z.detach(), yd, t, eps, extras=extras)
    d = torch.autograd.grad(det["denoise"].mean() + det["repa"].mean(), run.denoiser_params)
    att = run.objective.terms(run.net, z, yd, t, eps, extras=extras)
    ae_loss = recon + cfg.kl_weight * kl + cfg.vae_align_weight * att["repa"].mean() / 0.5
    if diffusion_into_ae:
        ae_loss = ae_loss + att["denoise"].mean()
    a = torch.autograd.grad(ae_loss, list(run.ae.parameters()), allow_unused=True)
    return d, [torch.zeros_like(p) if g is None else g for g, p in zip(a, run.ae.parameters())]


def test_diffusion_loss_stops_at_the_latents_and_repa_reaches_both(tmp_path):
    run = _setup(tmp_path)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 8, (4,), generator=g)
    grads_d, grads_a = run.gradients(run.losses(x, y, step=5))
    ref_d, ref_a = _reference_grads(run, x, y, 5, diffusion_into_ae=False)
    for a, b in zip(grads_d, ref_d):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads_a, ref_a):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    _, leaky = _reference_grads(run, x, y, 5, diffusion_into_ae=True)
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, leaky)) > 1e-5
    assert all(g.abs().sum() > 0 for g in grads_d[-3:])  # the projector learns
    # without alignment weight the autoencoder sees only its own losses (REPA-E's λ_v = 0)
    run0 = _setup(tmp_path / "z", vae_align_weight=0.0)
    _, a0 = run0.gradients(run0.losses(x, y, step=5))
    _, r0 = _reference_grads(run0, x, y, 5, diffusion_into_ae=False)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(a0, r0))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(a0, grads_a))


def test_repa_e_cli_saves_a_tiny_autoencoder_that_cache_latents_accepts(tmp_path, capsys):
    import yaml

    from denoiselab.latents import cache_latents_main

    run = _setup(tmp_path)  # writes the starting autoencoder
    start = {k: v.clone() for k, v in run.ae.state_dict().items()}
    raw = yaml.safe_load(yaml.safe_dump({
        "data": {"name": "shapes", "image_size": 16, "num_images": 32},
        "model": {"name": "JiT-Micro", "patch_size": 1, "bottleneck": None},
        "repa": {"block": 1, "teacher": {"offline": TINY_SSL, "cache_dir": str(tmp_path / "t")}},
        "batch": 4, "stats_images": 8,
    }))  # fmt: skip
    cfg_file = tmp_path / "repae.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "tuned"
    args = [str(cfg_file), "--autoencoder", str(tmp_path / "ae"), "--steps", "3", "--out", str(out)]
    assert repa_e_main(args) == 0
    ae = load_autoencoder(out)
    assert ae.kind == "tiny" and len(ae.config["latent_std"]) == 4
    assert ae.config["info"]["repa_e"]["vae_align_weight"] == 1.5
    assert any(not torch.equal(start[k], v) for k, v in ae.net.state_dict().items())
    src = tmp_path / "src.yaml"
    src.write_text(yaml.safe_dump({"data": {"name": "shapes", "image_size": 16, "num_images": 8}}))
    assert (
        cache_latents_main([str(src), "--autoencoder", str(out), "--out", str(tmp_path / "c")]) == 0
    )
    assert repa_e_main(["--out", str(tmp_path / "x")]) == 2
    assert "autoencoder: give the train-ae directory" in capsys.readouterr().err


def test_suites_may_vary_only_the_tokenizer_of_latent_data(tmp_path):
    import pytest
    import yaml

    from denoiselab.ablate import load_suite
    from denoiselab.config import ConfigError, to_dict

    suite = load_suite("latent_tokenizers")
    a, b = (suite.config(n) for n in suite.names)
    da, db = to_dict(a.data), to_dict(b.data)
    assert {k for k in da if da[k] != db[k]} == {"root"}
    assert to_dict(a) | {"data": None} == to_dict(b) | {"data": None}
    raw = {"base": {"data": {"name": "shapes", "image_size": 16}, "model": {"name": "JiT-Micro"}},
           "variants": {"a": {}, "b": {"data.latent_norm": "none"}}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"only latent data \(data.name: latents\) may vary"):
        load_suite(tmp_path / "s.yaml")


def test_the_denoiser_is_trained_on_every_term_of_its_objective(tmp_path):
    # objective.contrastive adds a term to the objective; the denoiser's loss summed only
    # "denoise" and "repa", so the push-away term was computed and silently dropped
    run = _setup(tmp_path, objective={"contrastive": 0.3, "noise_scale": 1.0})
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 8, (4,), generator=g)
    losses = run.losses(x, y, step=5)
    gen = torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + 5)
    mu, _ = run.ae.moments(x)
    torch.randn(mu.shape, generator=gen)  # the reconstruction's noise comes first
    z = (mu - run.mean) / run.std
    t, eps, yd = run.objective.draw(z, y, gen)
    terms = run.objective.terms(run.net, z, yd, t, eps, extras={"teacher": run.term.teacher(x)})
    assert set(terms) == {"denoise", "repa", "contrastive"}
    expected = sum(v.mean() for v in terms.values())
    torch.testing.assert_close(losses["denoiser_loss"], expected, rtol=1e-5, atol=1e-6)


def test_routing_of_the_latent_model_is_refused(tmp_path):
    """repa-e draws no routes for its latent model: a model.routing it would silently ignore
    (the model trained dense) is a ConfigError naming the key; kind none is accepted."""
    from denoiselab.config import ConfigError

    routed = {"name": "JiT-Micro", "routing": {"kind": "tread", "ratio": 0.5}}
    with pytest.raises(ConfigError, match=r"model.routing=.*repa-e trains its latent model dense"):
        _setup(tmp_path, model=routed)
    _setup(tmp_path, model={"name": "JiT-Micro", "routing": {"kind": "none"}})
