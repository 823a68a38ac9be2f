"""``denoiselab eval``: score a trained run with the metrics package, JiT protocol included.

The JiT protocol (App. A): choose the CFG scale ω and the EMA decay on a small sample count
(8K in the paper), then evaluate the full count (50K) with the best pair. Here
``--sweep-cfg LO:HI:STEP --sweep-num M`` does the first part, over every EMA decay of the
checkpoint unless ``--ema`` fixes one. Sampling (steps, solver, CFG scale and interval)
defaults to the run's own ``sample`` settings, those of its grids and periodic evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from denoiselab.cliutil import ArgumentParser, add_sampler_arguments, check_sampler_flags
from denoiselab.evaluation_clip import (
    CLIPSCORE,
    check_acc_probe_run,
    check_clipscore_run,
    eval_prompts,
    prompt_generator,
    score_clipscore,
)
from denoiselab.io import atomic_write_text
from denoiselab.latents import pixel_data_config
from denoiselab.metrics import METRICS, ProbeConfig, evaluate, to_uint8
from denoiselab.metrics.evaluate import check_sample_count
from denoiselab.train.build import Restored, restore
from denoiselab.train.ema import auto_decay

# Metrics where larger is better; all others (distances) are minimised.
_HIGHER_IS_BETTER = ("acc", "is", "precision", "recall", "clipscore")


def make_generator(
    r: Restored,
    *,
    cfg_scale: float,
    steps: int,
    solver: str,
    interval: tuple[float, float],
    eta: float = 1.0,
    **guidance: Any,
) -> Callable[[int, Tensor, int], Tensor]:
    """``(n, labels [n], seed) -> uint8 [n, 3, H, W]`` for :func:`denoiselab.metrics.evaluate`;
    ``guidance``: the sampler's ``guidance`` / ``sparse_ratio``."""

    def gen(n: int, labels: Tensor, seed: int) -> Tensor:
        x = r.sample(
            labels[:n],
            seed,
            steps=steps,
            solver=solver,
            cfg_scale=cfg_scale,
            interval=interval,
            eta=eta,
            **guidance,
        )
        return to_uint8(x.cpu())

    return gen


def parse_range(text: str) -> list[float]:
    """``"1.0:4.0:0.5"`` → ``[1.0, 1.5, …, 4.0]`` (inclusive)."""
    try:
        lo, hi, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--sweep-cfg {text!r} must look like LO:HI:STEP, e.g. 1:4:0.5") from None
    if step <= 0 or hi < lo:
        raise ValueError(f"--sweep-cfg {text!r}: need STEP > 0 and HI >= LO")
    n = math.floor((hi - lo) / step + 1e-9)
    return [round(lo + i * step, 10) for i in range(n + 1)]


def primary_key(result: dict[str, Any], metric: str) -> tuple[str, float]:
    """The value used to pick the best setting, signed so that smaller is better."""
    values = result["metrics"]
    key = (
        metric
        if metric in values
        else next(k for k in values if k.startswith(metric.split("_")[0]))
    )
    sign = -1.0 if any(key.startswith(p) for p in _HIGHER_IS_BETTER) else 1.0
    return key, sign * values[key]


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation ``eval_main`` describes. Under ``torchrun`` every rank generates a share
    of the batches (``metrics.evaluate``) and every rank returns the same result."""
    from denoiselab.train.distributed import init_distributed

    for flag, value, least in (
        ("--num", args.num, 2),
        ("--sweep-num", args.sweep_num, 2),
        ("--batch", args.batch, 1),
    ):
        if value < least:
            raise ValueError(f"{flag} {value} must be >= {least}")
    check_sampler_flags(args)
    info, dev = init_distributed(args.device or "auto")
    device = str(dev)
    main_rank = info.is_main
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    compositional = COMPOSITIONAL in metrics  # not registry metrics: scored from prompts
    clipscore = CLIPSCORE in metrics
    metrics = [m for m in metrics if m not in (COMPOSITIONAL, CLIPSCORE)]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(
            f"unknown metric(s) {unknown}; valid: {', '.join([*METRICS, COMPOSITIONAL, CLIPSCORE])}"
        )
    if args.sweep_cfg and not metrics:
        raise ValueError("--sweep-cfg picks by the first registry metric: add one to --metrics")
    check_sample_count(metrics, args.num, "--num")  # before the text metrics draw theirs
    if args.sweep_cfg:
        check_sample_count(metrics, args.sweep_num, "--sweep-num")
    paths = {
        k: v
        for k, v in (("inception", args.inception), ("clip", args.clip), ("dinov2", args.dinov2))
        if v
    }
    probe_cfg = ProbeConfig(steps=args.probe_steps) if args.probe_steps else None
    base = restore(args.run, ema=None, device=device, compile=args.compile)
    own = base.settings(args.steps, args.solver, args.cfg, args.cfg_interval, args.eta)
    check_acc_probe_run(base, metrics)
    scorer = None
    if clipscore:  # refused or loaded before anything is generated
        from denoiselab.metrics.clipscore import load_clip_scorer
        from denoiselab.metrics.extractors import resolve_extractor_path

        check_clipscore_run(base, args.run)
        clip_dir = resolve_extractor_path("clip", args.clip, args.cache_dir)
        scorer = load_clip_scorer(clip_dir, device, flag="--clip")
    decays = [args.ema] if args.ema is not None else sorted(base.checkpoint.ema) or [None]

    def score(ema: float | None, scale: float, num: int, seed: int) -> dict[str, Any]:
        r = (
            restore(args.run, ema=ema, device=device, compile=args.compile)
            if ema is not None
            else base
        )
        out: dict[str, Any] = {"metrics": {}}
        # both text metrics on shapes score the same held-out prompts and seeds: sample once
        both = compositional and clipscore and args.prompts is None
        # the text metrics sample with the registry metrics' guidance (--guidance, --sparse-ratio)
        guided = {**own, "guidance": args.guidance, "sparse_ratio": args.sparse_ratio}
        generate = prompt_generator(r.sample_prompts, guided, scale, both) if r.is_text else None
        if compositional:
            out["compositional"] = score_compositional(r, generate, num, seed, args, device)
            out["metrics"].update(compositional_summary(out["compositional"]))
        if clipscore:
            prompts = eval_prompts(r.cfg.data, num, seed, args.prompts)
            out[CLIPSCORE] = score_clipscore(prompts, generate, seed, scorer, args.batch)
            out["metrics"].update(out[CLIPSCORE]["metrics"])
        if not metrics:
            return {**out, "num": num, "probe_real_accuracy": None, "ema": ema, "cfg": scale}
        gen = make_generator(
            r,
            cfg_scale=scale,
            steps=own["steps"],
            solver=own["solver"],
            interval=own["interval"],
            eta=own["eta"],
            guidance=args.guidance,
            sparse_ratio=args.sparse_ratio,
        )
        registry = evaluate(
            gen,
            metrics=metrics,
            num=num,
            dataset_cfg=pixel_data_config(r.cfg.data),  # latent runs are scored in pixels
            num_classes=r.model_cfg.num_classes,
            batch=args.batch,
            seed=seed,
            extractor_paths=paths,
            cache_dir=args.cache_dir,
            device=device,
            probe_config=probe_cfg,
            inception_resize=args.fid_resize,
            num_ref=args.num_ref,
            reference_files={"inception": args.ref_stats} if args.ref_stats else None,
            # cmmd reads the clipscore model's vision tower: the weights are loaded once
            extractors={"clip": scorer.image_embedder()} if scorer is not None else None,
        )
        registry["metrics"].update(out["metrics"])
        if r.is_text:  # the label-keyed generator samples each label from a caption
            registry["prompts"] = "captions of the data's images of each label (class_prompts)"
        return {**out, **registry, "ema": ema, "cfg": scale}

    sweep: list[dict[str, Any]] = []
    ckpt = base.checkpoint
    auto = auto_decay(tuple(ckpt.ema), ckpt.step) if ckpt.ema else None
    ema, scale = (args.ema if args.ema is not None else auto), own["cfg_scale"]
    if args.sweep_cfg:
        for d in decays:
            for s in parse_range(args.sweep_cfg):
                res = score(d, s, args.sweep_num, args.seed + 1)  # other noise than the final run
                sweep.append({"ema": d, "cfg": s, "metrics": res["metrics"]})
                if main_rank:
                    print(f"sweep ema={d} cfg={s}: {res['metrics']}", file=sys.stderr)
        best = min(sweep, key=lambda r: primary_key(r, metrics[0])[1])
        ema, scale = best["ema"], best["cfg"]
    final = score(ema, scale, args.num, args.seed)
    final.update(
        run=str(Path(args.run).resolve()),
        step=base.checkpoint.step,
        solver=own["solver"],
        eta=own["eta"] if own["solver"] == "euler_maruyama" else None,
        sampling_steps=own["steps"],
        compile=bool(args.compile),
        cfg_interval=list(own["interval"]),
        guidance=args.guidance,
        sparse_ratio=args.sparse_ratio if args.guidance == "sparse" else None,
        sweep=sweep,
        selection=f"min over sweep of {metrics[0]} (sign-adjusted)" if sweep else "given",
        rank=info.rank,
    )
    return final


COMPOSITIONAL = "compositional"


def score_compositional(
    r: Restored, generate: Any, num: int, seed: int, args: Any, device: str
) -> dict[str, Any]:
    """The compositional score (:func:`denoiselab.metrics.compositional_score`) of a text run
    on ``shapes``: ``num`` held-out prompts (``shapes_prompts``; with ``data.holdout_pairs``
    half ask for pairs never seen in training), one sample each, the run's sampler."""
    from denoiselab.metrics import AttributeProbeConfig, compositional_score, shapes_prompts

    if not r.is_text:
        raise ValueError(
            f"metric {COMPOSITIONAL!r} scores prompts: {args.run} is a class-conditional run"
        )
    data = pixel_data_config(r.cfg.data)  # a latent cache: its source data, in pixels
    if data.name != "shapes":
        raise ValueError(
            f"metric {COMPOSITIONAL!r} judges shapes scenes; this run trains on "
            f"data.name={data.name!r}"
        )
    prompts = shapes_prompts(data, num, seed)
    return compositional_score(
        generate,
        prompts,
        dataset_cfg=data,
        probe_config=AttributeProbeConfig(steps=args.probe_steps) if args.probe_steps else None,
        batch=args.batch,
        seed=seed,
        cache_dir=args.cache_dir,
        device=device,
    )


def compositional_summary(result: dict[str, Any]) -> dict[str, float]:
    """Flat ``metrics`` entries of a compositional score: ``compositional/<attribute>``,
    ``compositional/all_correct`` and the same for never-seen pairs (``…_unseen``)."""
    out = {f"compositional/{k}": float(v) for k, v in result["accuracy"].items()}
    out["compositional/all_correct"] = float(result["all_correct"])
    unseen = result.get("unseen")
    if unseen:
        out.update({f"compositional_unseen/{k}": float(v) for k, v in unseen["accuracy"].items()})
        out["compositional_unseen/all_correct"] = float(unseen["all_correct"])
    return out


def check_out(out: Path) -> None:
    """``ValueError`` unless ``out`` can become the folder of ``eval.json``: checked before the
    evaluation, whose results would otherwise be lost at the end (nothing is created here)."""
    above = next(p for p in (out, *out.parents) if p.exists())
    if not above.is_dir():
        raise ValueError(f"--out {str(out)!r}: {str(above)!r} is not a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r}: {str(above)!r} is not writable")


def eval_main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="denoiselab eval", description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument(
        "--metrics",
        default="fd_probe,mmd_probe,acc_probe,pr_probe",
        help=f"comma-separated; valid: {', '.join(METRICS)}, {COMPOSITIONAL} (a text run "
        f"on shapes: per-attribute accuracy of prompted samples, never-seen pairs apart), "
        f"{CLIPSCORE} (a text run: 2.5·mean max(cos, 0) of CLIP image/prompt embeddings, "
        "Hessel et al. 2021, and 100·mean cos as clipscore_cos100; needs --clip)",
    )
    p.add_argument(
        "--num",
        "--num-samples",
        dest="num",
        type=int,
        default=1000,
        help="samples to score; under torchrun spell it --num-samples (torchrun reads --num "
        "as an abbreviation of its own --numa-binding)",
    )
    p.add_argument(
        "--ema",
        type=float,
        help="EMA decay (default: searched, or 'auto', see train.ema.auto_decay)",
    )
    add_sampler_arguments(p)
    p.add_argument("--sweep-cfg", help="LO:HI:STEP, e.g. 1:4:0.1 (JiT protocol)")
    p.add_argument("--sweep-num", type=int, default=256, help="samples per sweep point")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for sampling")
    p.add_argument("--cache-dir", help="probe/reference cache (default ~/.cache/denoiselab)")
    p.add_argument("--inception", help="pt_inception-2015-12-05 weights file (for fid/kid/is/pr)")
    p.add_argument(
        "--fid-resize",
        choices=["tf1_bilinear", "antialias"],
        default="tf1_bilinear",
        help="TF-Inception input resize: tf1_bilinear (ADM/torch-fidelity, the papers' FIDs) "
        "or antialias (torchmetrics >= 1.8); recorded in eval.json",
    )
    p.add_argument(
        "--ref-stats",
        metavar="FILE.npz",
        help="published Inception statistics for fid (arrays mu [2048], sigma [2048, 2048]: "
        "ADM's VIRTUAL_imagenet256_labeled.npz, JiT's fid_stats/jit_in256_stats.npz) instead "
        "of statistics of the run's data; see docs/evaluation.md",
    )
    p.add_argument(
        "--num-ref",
        type=int,
        help="real images behind reference statistics computed from the data (default: --num; "
        "the whole dataset if smaller)",
    )
    p.add_argument(
        "--clip",
        help="local CLIP directory: ViT-L/14@336 for cmmd (vision tower); a whole CLIPModel "
        "with its tokenizer for clipscore (e.g. openai/clip-vit-large-patch14-336 holds both)",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="clipscore prompts, one a line, cycled to --num (default: held-out shapes prompts, "
        "else captions of the data)",
    )
    p.add_argument("--dinov2", help="local DINOv2 ViT-L/14-reg directory (for dino_mmd)")
    p.add_argument(
        "--probe-steps", type=int, help="training steps of the offline probe (default 1000)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.ref_stats and "fid" not in args.metrics.split(","):
        p.error("--ref-stats holds Inception statistics for fid: add fid to --metrics")
    if args.prompts and CLIPSCORE not in args.metrics.split(","):
        p.error(f"--prompts are the prompts of {CLIPSCORE}: add {CLIPSCORE} to --metrics")
    if args.num_ref is not None and args.num_ref < 2:
        p.error(f"--num-ref {args.num_ref}: must be >= 2")
    try:
        check_out(Path(args.out))
        result = run_eval(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"denoiselab eval: error: {e}", file=sys.stderr)
        return 2
    from denoiselab.train.distributed import shutdown

    shutdown()  # every rank has its result: no collective follows
    if result.pop("rank") != 0:
        return 0  # rank 0 writes eval.json
    out = Path(args.out)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2, default=str))
    summary = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
    if result.get("probe_real_accuracy") is not None:
        summary += f" (the probe on held-out real images: {result['probe_real_accuracy']:.4g})"
    print(f"eval ({result['num']} samples, ema={result['ema']}, cfg={result['cfg']}): {summary}")
    return 0
