"""The ``README.md`` model card of an export: Hugging Face metadata, usage, recipe, numbers.

Every number in the card is read from the run (config, checkpoint step, ``eval.json``, the last
periodic evaluation row of ``metrics.jsonl``); nothing is typed in by hand.
"""

from __future__ import annotations

from typing import Any

from denoiselab.models import count_params
from denoiselab.train.build import Restored


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"| {k} | {_fmt(v)} |" for k, v in pairs)


def _recipe(config: dict[str, Any], r: Restored) -> str:
    cfg, mc = r.cfg, r.model_cfg
    obj, opt, data = cfg.objective, cfg.optim, cfg.data
    time = obj.time
    pairs = [
        (
            "network",
            f"JiT ({cfg.model.get('name', '?')} preset), {count_params(mc) / 1e6:.2f}M parameters",
        ),
        ("width × depth, heads", f"{mc.hidden_size} × {mc.depth}, {mc.num_heads}"),
        (
            "image, patch",
            f"{mc.image_size}×{mc.image_size}×{mc.in_channels}, {mc.patch_size}×{mc.patch_size}",
        ),
        ("bottleneck patch embedding", mc.bottleneck or "none"),
        (
            "in-context class tokens",
            f"{mc.in_context_len} from block {mc.in_context_start}"
            if mc.in_context_len
            else "none",
        ),
        ("classes", mc.num_classes),
        ("data", f"{data.name}" + (f" ({data.root})" if data.root else "")),
        ("prediction / loss space", f"{obj.prediction} / {obj.loss_space}"),
        (
            "time sampler",
            f"{time.kind} (μ={time.mu}, σ={time.sigma})"
            if time.kind == "logit_normal"
            else time.kind,
        ),
        ("noise scale, t_eps", f"{obj.noise_scale}, {obj.t_eps}"),
        ("label drop (for CFG)", obj.label_drop),
        (
            "optimizer",
            f"AdamW, lr {opt.resolved_lr(cfg.global_batch):.3g}, betas {tuple(opt.betas)}, weight decay {opt.weight_decay}",
        ),
        (
            "batch, steps, images seen",
            f"{cfg.global_batch}, {r.checkpoint.step:,}, {config['weights']['nimg']:,}",
        ),
        (
            "EMA decays kept / exported",
            f"{list(cfg.ema.decays)} / {config['weights']['ema'] or 'raw weights'}",
        ),
    ]
    return _rows(pairs)


def _evaluation(evaluation: dict[str, Any] | None, periodic: dict[str, Any] | None) -> str:
    parts = []
    if evaluation:
        metrics = evaluation.get("metrics", {})
        parts.append(
            f"`denoiselab eval` ({evaluation.get('num', '?')} class-balanced samples, CFG "
            f"{evaluation.get('cfg', '?')}, EMA {evaluation.get('ema', '?')}, "
            f"{evaluation.get('sampling_steps', '?')} {evaluation.get('solver', '')} steps):\n\n"
            "| metric | value |\n| --- | --- |\n" + _rows(sorted(metrics.items()))
        )
        refs = evaluation.get("reference", {})
        for kind, ref in refs.items():
            src = ref.get("path", "?")
            count = ref.get("count")
            parts.append(f"Reference ({kind}): `{src}`" + (f", {count:,} images" if count else ""))
    if periodic:
        values = [(k, v) for k, v in periodic.items() if k.startswith("eval/")]
        parts.append(
            f"Last periodic evaluation during training (step {periodic.get('step')}):\n\n"
            "| metric | value |\n| --- | --- |\n" + _rows(values)
        )
    return "\n\n".join(parts) if parts else "No evaluation was recorded for this run."


def model_card(
    config: dict[str, Any],
    r: Restored,
    *,
    evaluation: dict[str, Any] | None,
    periodic: dict[str, Any] | None,
    has_grid: bool,
    name: str,
) -> str:
    """The card's Markdown (YAML front matter for the Hub, then usage, recipe, evaluation)."""
    s = config["sampling"]
    names = config.get("class_names")
    classes = f"Classes: {', '.join(f'{i} {n}' for i, n in enumerate(names))}." if names else ""
    grid = "![samples](samples.png)\n\nThe run's last sample grid." if has_grid else ""
    return f"""---
library_name: denoiselab
tags:
- diffusion
- flow-matching
- jit
- class-conditional-image-generation
---

# {name}

A class-conditional JiT ("Just image Transformer", Li & He: *Back to Basics: Let Denoising
Generative Models Denoise*) that predicts clean images ({config["prediction"]}-prediction,
{config["loss_space"]}-loss), trained with denoiselab to step
{config["weights"]["step"]:,}. {classes}

## Use

```python
import denoiselab

model = denoiselab.from_pretrained("{name}")  # this folder, or its hub id owner/name
images = model.sample(labels=[0, 1, 2], steps={s["steps"]}, cfg={s["cfg"]}, seed=0)
# float [3, {config["model"]["in_channels"]}, {config["model"]["image_size"]}, {config["model"]["image_size"]}] in [-1, 1]
```

Recommended sampler (the run's own setting): {s["solver"]}, {s["steps"]} steps, CFG {s["cfg"]}
on the interval {tuple(s["interval"])} of t (t = 1 is data, t = 0 is noise).

## Training recipe

| | |
| --- | --- |
{_recipe(config, r)}

The complete resolved configuration is `train_config` in `config.json`.

## Evaluation

{_evaluation(evaluation, periodic)}

{grid}

## Files

- `model.safetensors`: the network's weights ({"EMA " + str(config["weights"]["ema"]) if config["weights"]["ema"] else "raw"}).
- `config.json`: network, prediction space, noise scale, sampler settings, class names, recipe.
"""
