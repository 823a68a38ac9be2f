"""``run_bench``: the matmul ceiling, training and sampling throughput, MFU → ``bench.json``.

FLOPs are counted analytically (``models.flops.forward_macs``: linear layers and attention
matmuls, 1 MAC = 2 FLOPs). Training costs 3 × forward per image (forward + backward);
sampling costs one forward per *network image-evaluation* (inside the CFG interval each image
is evaluated twice, conditional and unconditional, outside it once).
MFU = achieved model FLOP/s ÷ the measured matmul FLOP/s in the same dtype and run.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from denoiselab.bench.breakdown import measure_breakdown
from denoiselab.bench.ceiling import matmul_ceiling
from denoiselab.bench.data import bench_data, data_config, data_summary
from denoiselab.bench.machine import load_average, machine_facts, native_bf16
from denoiselab.bench.profiling import top_ops_table
from denoiselab.bench.terms import bench_terms, parse_term_spec
from denoiselab.bench.terms import summary_part as terms_summary
from denoiselab.bench.timing import measure, peak_memory, reset_peak_memory, time_once
from denoiselab.bench.variants import (
    TrainVariant,
    bench_variants,
    parse_optim,
    parse_routing,
    summary_part,
    variant_config,
)
from denoiselab.bench.workloads import (
    SampleWorkload,
    TrainWorkload,
    bench_train_config,
    resolved_model_config,
)
from denoiselab.config import apply_overrides, from_dict, to_dict
from denoiselab.models import JiTConfig, count_params, forward_macs
from denoiselab.sampling import nfe
from denoiselab.train.config import TrainConfig

FLOPS_NOTE = (
    "analytic (models.flops.forward_macs): linear layers + attention matmuls, 1 MAC = 2 FLOPs; "
    "training = 3 × forward per image; sampling = forward × network image-evaluations"
)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Defaults: the CPU reference configuration (JiT-T/4, batch 64) in
    ``dtype="auto"``: bf16 where the device has native bf16 (:func:`native_bf16`), else fp32.

    ``warmup``/``repeats``: untimed and timed training steps. Sampling warms up with one
    2-step run (it compiles both batch shapes) and times ``sample_repeats`` full runs.
    ``breakdown``: afterwards, ``repeats`` more steps timed phase by phase, alternating with
    as many bare steps (``bench.breakdown``).
    ``sets``: ``key=value`` overrides of the training config (e.g. ``model.depth=4``).
    ``routing`` / ``optim``: training-step variants (``tread:0.5``, ``muon:fp32``; see
    ``bench.variants``) timed against the dense AdamW step in the same run.
    """

    model: str = "JiT-T/4"
    image_size: int | None = None
    batch: int = 64
    sample_batch: int | None = 16  # None: same as batch; 16 keeps a CPU run short
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    what: Literal["train", "sample", "all"] = "all"
    device: str = "auto"
    threads: int | None = None  # CPU intra-op threads; None: torch's default
    warmup: int = 2
    repeats: int = 5
    sample_steps: int = 50
    sample_repeats: int = 3
    cfg_scale: float = 2.0
    interval: tuple[float, float] = (0.1, 1.0)
    matmul_max_size: int | None = None
    profile: bool = False
    repa: tuple[str, ...] = ()  # loss-term SPECs timed against the step without terms
    breakdown: bool = False
    sets: tuple[str, ...] = ()
    routing: tuple[str, ...] = ()
    optim: tuple[str, ...] = ()
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    compile_mode: str = "default"
    data: str | None = None  # an imagefolder or prepared folder: time the input pipeline too
    data_batches: int = 20
    workers: int | None = None  # loader workers with --data (None: data.num_workers "auto")

    def __post_init__(self) -> None:
        for name in ("batch", "repeats", "sample_steps", "sample_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench: {name}={getattr(self, name)!r} must be >= 1")
        if self.sample_batch is not None and self.sample_batch < 1:
            raise ValueError(f"bench: sample_batch={self.sample_batch!r} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"bench: warmup={self.warmup!r} must be >= 0")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"bench: dtype={self.dtype!r}; valid: 'auto', 'fp32', 'bf16'")
        if self.what not in ("train", "sample", "all", "data"):
            raise ValueError(f"bench: what={self.what!r}; valid: 'train', 'sample', 'all', 'data'")
        if self.what == "data" and self.data is None:
            raise ValueError("bench: what='data' times the input pipeline: give --data PATH")
        if self.data_batches < 1 or (self.workers is not None and self.workers < 0):
            raise ValueError("bench: data_batches must be >= 1 and workers >= 0")
        if self.cfg_scale == 1.0:
            raise ValueError("bench: cfg_scale=1.0 disables guidance; the benchmark times CFG")
        if self.breakdown and self.what == "sample":
            raise ValueError("bench: breakdown splits the training step; use what='train' or 'all'")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ValueError("bench: dtype 'auto' is resolved by choose_dtype() first")
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def variants(self) -> list[TrainVariant]:
        """The training-step variants to compare with the base (ValueError on a bad spec)."""
        return [*map(parse_routing, self.routing), *map(parse_optim, self.optim)]


def choose_dtype(bc: BenchConfig) -> tuple[BenchConfig, str]:
    """``bc`` with ``dtype="auto"`` resolved (bf16 where the device has native bf16, else fp32)
    and the reason, e.g. ``"auto → fp32: CPU has neither AMX nor AVX512-BF16 …"``."""
    if bc.dtype != "auto":
        return bc, f"{bc.dtype}: as requested"
    native, why = native_bf16(_device(bc.device))
    dtype = "bf16" if native else "fp32"
    return dataclasses.replace(bc, dtype=dtype), f"auto → {dtype}: {why}"


def _device(name: str) -> torch.device:
    from denoiselab.train.distributed import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise ValueError(f"bench: {e}") from None


def prepare(bc: BenchConfig) -> tuple[torch.device, TrainConfig, JiTConfig]:
    """Resolve and validate the device, training config and network (raises ValueError)."""
    device = _device(bc.device)
    from denoiselab.config import ConfigError

    bc, _ = choose_dtype(bc)
    try:
        data = data_config(bc) if bc.data is not None else None
        if data is not None:  # a folder without images is named now, before any timing
            from denoiselab.data import build_dataset

            build_dataset(data)
        tc = bench_train_config(
            bc.model, bc.image_size, bc.batch, bc.dtype, bc.compile, str(device), data=data,
            strategy=bc.strategy, activation_checkpointing=bc.activation_checkpointing,
            compile_mode=bc.compile_mode,
        )  # fmt: skip
    except ConfigError as e:
        raise ValueError(f"bench: {e}") from None
    for spec in bc.repa:
        parse_term_spec(spec)
    if bc.sets:
        tc = from_dict(TrainConfig, apply_overrides(to_dict(tc), list(bc.sets)))
    for v in bc.variants():
        variant_config(tc, v)  # a routing range outside the depth is named now
    return device, tc, resolved_model_config(tc)


def model_facts(name: str, mc: JiTConfig) -> dict[str, Any]:
    gflops = forward_macs(mc)["gflops"]
    return {
        "name": name,
        "config": dataclasses.asdict(mc),
        "params": count_params(mc),
        "patch_tokens": mc.num_patches,
        "in_context_tokens": mc.in_context_len,
        "forward_gflops_per_image": gflops,
        "train_gflops_per_image": 3 * gflops,
        "flops_note": FLOPS_NOTE,
    }


def bench_train(
    tc: TrainConfig, bc: BenchConfig, forward_gflops: float, ceiling: float, out: Path
) -> dict[str, Any]:
    """Median (and best) images/s of ``Trainer.train_step`` over ``bc.repeats`` timed steps.

    The best repeat is what an otherwise idle machine gives; on a shared one it can be far
    above the median.
    """
    with tempfile.TemporaryDirectory() as run_dir:
        work = TrainWorkload.build(tc, Path(run_dir))
        try:
            device = work.trainer.device
            reset_peak_memory(device)
            timings = measure(work, device, warmup=bc.warmup, repeats=bc.repeats)
            memory = peak_memory(device)
            if bc.profile:
                (out / "profile_train.txt").write_text(top_ops_table(work, device))
            breakdown = measure_breakdown(work, bc.repeats) if bc.breakdown else None
        finally:
            work.trainer.close()
    images_per_s = tc.global_batch / timings.median_s
    achieved = images_per_s * 3 * forward_gflops
    return {
        "images_per_s": images_per_s,
        "images_per_s_best": tc.global_batch / min(timings.repeats_s),
        "tokens_per_s": images_per_s * work.trainer.model_cfg.num_patches,
        "step_s_median": timings.median_s,
        "steps_s": timings.repeats_s,
        "warmup_s": timings.warmup_s,
        "achieved_gflops_per_s": achieved,
        "mfu": achieved / ceiling,
        **memory,
        **({"breakdown": breakdown} if breakdown else {}),
    }


def bench_sample(
    mc: JiTConfig, bc: BenchConfig, device: torch.device, ceiling: float, out: Path
) -> dict[str, Any]:
    """Median images/s of full Heun runs with CFG (interval ``bc.interval``)."""
    batch = bc.sample_batch or bc.batch
    work = SampleWorkload.build(
        mc,
        device,
        batch=batch,
        compile_=bc.compile,
        steps=bc.sample_steps,
        cfg_scale=bc.cfg_scale,
        interval=bc.interval,
        bf16=bc.dtype == "bf16",
    )
    reset_peak_memory(device)
    warm = time_once(lambda: work(steps=2), device) if bc.warmup else 0.0
    timings = measure(work, device, warmup=0, repeats=bc.sample_repeats)
    memory = peak_memory(device)
    if bc.profile:
        (out / "profile_sample.txt").write_text(top_ops_table(_one_guided_eval(work), device))
    evals = work.images_evaluated
    achieved = evals / timings.median_s * forward_macs(mc)["gflops"]
    return {
        "batch": batch,
        "images_per_s": batch / timings.median_s,
        "images_per_s_best": batch / min(timings.repeats_s),
        "run_s_median": timings.median_s,
        "runs_s": timings.repeats_s,
        "warmup_s": warm,
        "nfe": nfe(bc.sample_steps, "heun"),
        "network_evals_per_image": evals / batch,
        "achieved_gflops_per_s": achieved,
        "mfu": achieved / ceiling,
        **memory,
    }


def _one_guided_eval(work: SampleWorkload) -> Any:
    fn = work.guidance()

    @torch.no_grad()
    def step() -> None:
        with work.autocast():
            fn(work.noise, 0.5)

    return step


def summary_line(result: dict[str, Any]) -> str:
    """One line: model, setting, training and sampling throughput and MFU, ceiling, load."""
    c, m = result["config"], result["machine"]
    parts = [
        f"bench {c['model']} {result['model']['config']['image_size']}px b{c['batch']} "
        f"{c['dtype']}{' compile' if c['compile'] else ''} {m['device']}"
    ]
    if c.get("strategy", "ddp") != "ddp" or c.get("activation_checkpointing"):
        parts[0] += f" {c['strategy']}{' +AC' if c['activation_checkpointing'] else ''}"
    if "train" in result:
        r = result["train"]
        parts.append(
            f"train {r['images_per_s']:.1f} img/s ({r['tokens_per_s']:.0f} tok/s, "
            f"MFU {100 * r['mfu']:.0f}%, peak {r['peak_memory_mib'] / 1024:.2f} GiB)"
        )
    if "sample" in result:
        r = result["sample"]
        parts.append(
            f"sample heun-{c['sample_steps']}+cfg {r['images_per_s']:.2f} img/s "
            f"(MFU {100 * r['mfu']:.0f}%)"
        )
    if "terms" in result:
        parts.append(terms_summary(result["terms"]))
    if "compare" in result:
        parts.append(summary_part(result["compare"]))
    if "data" in result:
        parts.append(data_summary(result["data"]))
    if "ceiling" in result:
        ceiling = result["ceiling"]
        parts.append(f"matmul {ceiling['dtype']} {ceiling['gflops_per_s']:.1f} GFLOP/s")
    parts.append(f"load {m['load_average']} → {m['load_average_end']}")
    return " | ".join(parts)


def run_bench(bc: BenchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Measure what ``bc`` asks for, write ``out_dir/bench.json`` and return its content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bc, dtype_reason = choose_dtype(bc)
    device, tc, mc = prepare(bc)
    threads = torch.get_num_threads()
    if bc.threads is not None:
        torch.set_num_threads(bc.threads)
    try:
        result: dict[str, Any] = {
            "config": dataclasses.asdict(bc),
            "dtype_choice": dtype_reason,
            "machine": machine_facts(device),
            "model": model_facts(bc.model, mc),
        }
        if bc.what != "data":
            result["ceiling"] = matmul_ceiling(device, bc.torch_dtype, max_size=bc.matmul_max_size)
            ceiling = result["ceiling"]["gflops_per_s"]
            gflops = result["model"]["forward_gflops_per_image"]
        if bc.what in ("train", "all"):
            result["train"] = bench_train(tc, bc, gflops, ceiling, out)
            if bc.variants():
                result["compare"] = bench_variants(tc, bc.variants(), bc.warmup, bc.repeats)
        if bc.repa:
            result["terms"] = bench_terms(tc, list(bc.repa), bc.warmup, bc.repeats)
        if bc.data is not None:
            result["data"] = bench_data(tc, bc, result.get("train"))
        if bc.what in ("sample", "all"):
            result["sample"] = bench_sample(mc, bc, device, ceiling, out)
    finally:
        torch.set_num_threads(threads)
    result["machine"]["load_average_end"] = load_average()
    result["summary"] = summary_line(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
