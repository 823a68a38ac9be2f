#!/usr/bin/env python
"""Side by side, alternating: the official JiT code's training step against
denoiselab's ``Trainer.train_step`` on the same configuration (issue #21).

The official code is *not* part of this repository. Point ``--official-dir`` at a folder
holding its ``model_jit.py``, ``denoiser.py`` and ``util/model_util.py`` (and, if einops is
not installed, einops in ``OFFICIAL_DIR/_deps``). Its training step is the one of
``engine_jit.train_one_epoch``: set the lr, uint8 images → [-1, 1], ``loss = model(x, y)``,
``loss.item()`` + finiteness check, ``zero_grad``, ``backward``, ``AdamW.step`` (built as
``main_jit.py`` builds it: two parameter groups, default implementation) and
``update_ema()`` (two decays). On a machine without CUDA its ``.cuda()`` calls are removed as its
source is loaded (the identity there) and its ``torch.cuda.synchronize()`` is skipped;
nothing else is changed.

Configuration (denoiselab's JiT-T/4 preset, built in both): 32 px, patch 4, width 192,
depth 6, 3 heads, bottleneck 32, 8 in-context tokens from block 2, 10 classes; fp32,
batch 64, ``--threads`` CPU threads; denoiselab with as many EMA decays as theirs (2).

Each variant runs in its own worker process (built and warmed up one after the other, then
idle between requests), so that process-wide settings (threads, the allocator setting of
``train.allocator``, compiled code) stay apart as they would in separate runs. Variants are
timed alternately, ``--rounds`` rounds of ``--steps`` steps each, the order rotating every
round so that none always runs first. Reported: the median step time of
each variant and the median over rounds of each per-round ratio against the official eager
step (a ratio within a round is measured under the same load). ``uptime`` is recorded
before and after.

    python benchmarks/official_jit_compare.py --official-dir /tmp/jit_official \\
        --variants official-eager ours-eager ours-compile --rounds 7 --steps 6 \\
        --out runs/bench/official-compare.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from denoiselab.bench.machine import machine_facts
from denoiselab.bench.workloads import TrainWorkload, bench_train_config
from denoiselab.train.allocator import applied, retain_freed_memory
from denoiselab.train.config import EMAConfig
from denoiselab.train.run import git_revision

MODEL = "JiT-T/4"
VARIANTS = ("official-eager", "official-compile", "ours-eager", "ours-compile", "ours-autotune")
# ours-autotune: ``train.compile_mode: max-autotune-no-cudagraphs`` (inductor also times its
# own C++ GEMM templates against the library's; minutes of compile time)
EMA_DECAYS = (0.9999, 0.9996)  # the official code's ema_decay1, ema_decay2


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return str(os.getloadavg())


def _import_official(official_dir: Path) -> types.ModuleType:
    """Import the official ``denoiser`` from ``official_dir``. On a machine without CUDA its
    ``.cuda()`` calls (RoPE tables, the zero attention bias) are removed from the source as
    it is loaded: every tensor already is on the CPU, so they would be the identity, and
    this way they are also gone inside its ``torch.compile`` regions."""
    for path in (official_dir / "_deps", official_dir):
        if path.is_dir():
            sys.path.insert(0, str(path))
    port = not torch.cuda.is_available()
    import util  # from --official-dir (its util/ package)

    util.model_util = _load_source("util.model_util", official_dir / "util" / "model_util.py", port)
    _load_source("model_jit", official_dir / "model_jit.py", port)
    import denoiser  # from --official-dir

    return denoiser


def _load_source(name: str, path: Path, drop_cuda_calls: bool) -> types.ModuleType:
    source = path.read_text()
    if drop_cuda_calls:
        source = source.replace(".cuda()", "")
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def _official_args(batch: int) -> argparse.Namespace:
    """main_jit.py's defaults, with JiT-T/4's size."""
    return argparse.Namespace(
        model="JiT-T/4",
        img_size=32,
        class_num=10,
        attn_dropout=0.0,
        proj_dropout=0.0,
        label_drop_prob=0.1,
        P_mean=-0.8,
        P_std=0.8,
        t_eps=0.05,
        noise_scale=1.0,
        ema_decay1=EMA_DECAYS[0],
        ema_decay2=EMA_DECAYS[1],
        lr=5e-5 * batch / 256,
        weight_decay=0.0,
    )


def _eager_forward(module: torch.nn.Module) -> None:
    """Undo the official code's ``@torch.compile`` on ``forward`` for this instance."""
    fn = type(module).forward
    orig = getattr(fn, "_torchdynamo_orig_callable", None)
    if orig is not None:
        module.forward = types.MethodType(orig, module)  # type: ignore[method-assign]


class OfficialStep:
    """One call = one iteration of ``engine_jit.train_one_epoch`` on a fixed batch."""

    def __init__(self, denoiser: types.ModuleType, batch: int, compiled: bool, device) -> None:
        import model_jit  # from --official-dir

        args = _official_args(batch)
        model_jit.JiT_models["JiT-T/4"] = lambda **kw: model_jit.JiT(
            depth=6, hidden_size=192, num_heads=3, bottleneck_dim=32, in_context_len=8,
            in_context_start=2, patch_size=4, **kw,
        )  # fmt: skip
        torch.manual_seed(0)
        model = denoiser.Denoiser(args).to(device)
        if not compiled:
            for m in model.modules():
                _eager_forward(m)
        model.ema_params1 = [p.detach().clone() for p in model.parameters()]
        model.ema_params2 = [p.detach().clone() for p in model.parameters()]
        decay, no_decay = [], []
        for name, p in model.named_parameters():  # util.misc.add_weight_decay
            if p.requires_grad:
                (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
        groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
        self.model, self.args, self.device = model, args, device
        _nudge(model.net)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 10, (batch,), generator=g)
        model.train(True)

    def __call__(self) -> None:
        for group in self.optimizer.param_groups:  # lr_sched.adjust_learning_rate
            group["lr"] = self.args.lr
        x = self.images.to(self.device, non_blocking=True).to(torch.float32).div_(255)
        x = x * 2.0 - 1.0
        labels = self.labels.to(self.device, non_blocking=True)
        with torch.amp.autocast("cuda", dtype=torch.bfloat16):
            loss = self.model(x, labels)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"official step: loss is {loss_value}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.model.update_ema()


class OursStep:
    """One call = ``Trainer.train_step`` (as ``denoiselab bench`` times it) + the loop's
    per-step finiteness bookkeeping; two EMA decays like the official code."""

    def __init__(self, batch: int, mode: str, device, run_dir: Path) -> None:
        compile_mode = "max-autotune-no-cudagraphs" if mode == "autotune" else "default"
        cfg = bench_train_config(
            MODEL, None, batch, "fp32", mode != "eager", str(device), compile_mode=compile_mode
        )
        cfg = dataclasses.replace(cfg, ema=EMAConfig(decays=EMA_DECAYS))
        self.work = TrainWorkload.build(cfg, run_dir)
        _nudge(self.work.trainer.model)

    def __call__(self) -> None:
        self.work()


@torch.no_grad()
def _nudge(net: torch.nn.Module, std: float = 0.02) -> None:
    """Leave the zero init (adaLN-Zero, zero output layer), as ``denoiselab bench`` does."""
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)


def _build(name: str, denoiser, batch: int, device, run_dir: Path) -> Callable[[], None]:
    side, mode = name.split("-")
    if side == "official":
        return OfficialStep(denoiser, batch, mode == "compile", device)
    return OursStep(batch, mode, device, run_dir / name)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _time(fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def worker(args: argparse.Namespace) -> int:
    """One variant in its own process: build, warm up, then time ``run K`` requests read
    from stdin, answering one JSON line each on stdout (the protocol's only output)."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything else printed goes to stderr
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker.startswith("official") and args.official_retain_memory:
        retain_freed_memory()
    denoiser = _import_official(args.official_dir) if args.worker.startswith("official") else None
    with tempfile.TemporaryDirectory() as tmp:
        step = _build(args.worker, denoiser, args.batch, device, Path(tmp))
        warm = sum(_time(step) for _ in range(args.warmup))
        info = {"warmup_s": warm, "pid": os.getpid(), "retain_freed_memory": applied()}
        protocol.write(json.dumps(info) + "\n")
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] != "run":
                break
            clock = CLOCKS[args.clock]
            protocol.write(json.dumps([_time(step, clock) for _ in range(int(cmd[1]))]) + "\n")
    return 0


def _spawn(variant: str, args: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, __file__, "--worker", variant, "--official-dir", str(args.official_dir),
           "--batch", str(args.batch), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--clock", args.clock]  # fmt: skip
    if args.official_retain_memory:
        cmd.append("--official-retain-memory")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"worker {variant} exited with {proc.wait()} before it was ready")
    return proc, json.loads(line)


def _run(proc: subprocess.Popen, steps: int) -> list[float]:
    proc.stdin.write(f"run {steps}\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    return json.loads(proc.stdout.readline())  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-dir", required=True, type=Path)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument(
        "--official-retain-memory",
        action="store_true",
        help="give the official code's processes denoiselab's allocator setting too "
        "(train.allocator), to separate that gain from the code's",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: perf_counter; cpu: the stepping thread's CPU time (--threads 1 only; "
        "on a shared machine it counts the work, not the waiting)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.official_dir / "denoiser.py").is_file():
        print(f"--official-dir {args.official_dir}: no denoiser.py there", file=sys.stderr)
        return 2
    if args.clock == "cpu" and args.threads != 1:
        print("--clock cpu needs --threads 1 (other threads' time is not counted)", file=sys.stderr)
        return 2
    if args.worker:
        return worker(args)
    if "official-eager" not in args.variants:
        print("--variants must include official-eager (the reference)", file=sys.stderr)
        return 2
    start_uptime = _uptime()
    workers, ready = {}, {}
    try:
        for v in args.variants:  # one at a time: a compile warm-up is not timed against others
            workers[v], ready[v] = _spawn(v, args)
            print(f"{v}: ready, warm-up {ready[v]['warmup_s']:.1f} s", file=sys.stderr, flush=True)
        times: dict[str, list[list[float]]] = {v: [] for v in args.variants}
        order = list(args.variants)
        for r in range(args.rounds):
            for v in order[r % len(order) :] + order[: r % len(order)]:
                times[v].append(_run(workers[v], args.steps))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v} {1e3 * statistics.median(times[v][-1]):.0f} ms" for v in order
            ), file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.stdin.close()  # type: ignore[union-attr]
                proc.wait()
    result = _summarise(times, args.batch)
    result.update(
        uptime_start=start_uptime,
        uptime_end=_uptime(),
        workers=ready,
        machine=machine_facts(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        command=" ".join(["benchmarks/official_jit_compare.py", *(argv or sys.argv[1:])]),
        revision=git_revision(),  # denoiselab's source tree, "-dirty" with uncommitted edits
        config=dict(model=MODEL, batch=args.batch, threads=args.threads, dtype="fp32", clock=args.clock,
                    ema_decays=list(EMA_DECAYS), rounds=args.rounds, steps=args.steps,
                    official_retain_memory=args.official_retain_memory),
    )  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    for line in _table(result):
        print(line)
    return 0


def _summarise(times: dict[str, list[list[float]]], batch: int) -> dict:
    ref = [statistics.median(r) for r in times["official-eager"]]
    out: dict = {"variants": {}}
    for v, rounds in times.items():
        per_round = [statistics.median(r) for r in rounds]
        flat = [t for r in rounds for t in r]
        out["variants"][v] = {
            "step_ms_median": 1e3 * statistics.median(flat),
            "images_per_s": batch / statistics.median(flat),
            "per_round_step_ms": [1e3 * t for t in per_round],
            "speedup_vs_official_eager": statistics.median(a / b for a, b in zip(ref, per_round)),
        }
    return out


def _table(result: dict) -> list[str]:
    rows = [
        "| variant | step ms (median) | img/s | × official eager (median of per-round ratios) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for v, r in result["variants"].items():
        rows.append(
            f"| {v} | {r['step_ms_median']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['speedup_vs_official_eager']:.3f} |"
        )
    rows.append(f"uptime: {result['uptime_start']}  →  {result['uptime_end']}")
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
