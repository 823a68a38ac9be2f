"""Speed work, checked for correctness: every fast path equals the reference path (fp32,
eager) within its dtype's tolerance; the CFG interval skips the expected evaluations;
``denoiselab bench`` runs end to end. No assertion here is about time."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from denoiselab.bench import bench_main, matmul_ceiling
from denoiselab.bench.breakdown import summarise
from denoiselab.bench.workloads import SampleWorkload, bench_train_config
from denoiselab.models import AxialRoPE, apply_rope, axial_rope_angles, build_model
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.sampling.generate import compile_for_sampling, generate, noise_for
from denoiselab.train.loop import Trainer
from denoiselab.train.stepclock import PHASES, PhaseClock, TimedNet

BETA1 = 0.9  # Trainer's AdamW β₁ (Table 9): after one step exp_avg = (1 − β₁)·grad


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _randomize(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Leave the zero init (adaLN-Zero) so that every weight gets a gradient."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------- layer fast path


@pytest.mark.parametrize("compiling", [False, True])
def test_fast_rope_equals_the_pairwise_rotation(compiling: bool, monkeypatch) -> None:
    """AxialRoPE (full-width tables; under torch.compile the pair swap is an exact
    permutation matmul) equals the reference rotation ``apply_rope`` bit for bit."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    rope = AxialRoPE(head_dim=16, grid=4, num_prefix=3)
    idx = torch.arange(16)
    angles = torch.cat([torch.zeros(3, 8), axial_rope_angles(idx // 4, idx % 4, 16)])
    x = torch.randn(2, 3, 19, 16)
    assert torch.equal(rope(x), apply_rope(x, angles.cos(), angles.sin()))
    assert not torch.equal(rope(x), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = rope(x.bfloat16())
    ref = apply_rope(x.bfloat16(), angles.cos(), angles.sin())
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, ref)


# --------------------------------------------------------------------------- training step


def _trainer(tmp_path: Path, dtype: str, compile_: bool = False) -> Trainer:
    cfg = bench_train_config("JiT-Micro", None, 8, dtype, compile_, "cpu")
    trainer = Trainer(cfg, tmp_path / f"{dtype}-{compile_}", quiet=True)
    _randomize(trainer.model)
    return trainer


def _one_step(trainer: Trainer) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Loss, gradients (read back from AdamW's first moment) and weights after one step."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (8,), generator=g)
    loss = trainer.train_step(0, images, labels)["denoise"]
    params = list(trainer.model.parameters())
    grads = [trainer.optimizer.state[p]["exp_avg"] / (1 - BETA1) for p in params]
    return loss, grads, [p.detach().clone() for p in params]


def _assert_step_close(fast: Trainer, ref: Trainer, loss_tol: float, grad_tol: float) -> None:
    loss_f, grads_f, _ = _one_step(fast)
    loss_r, grads_r, _ = _one_step(ref)
    assert abs(loss_f.item() - loss_r.item()) <= loss_tol * loss_r.item()
    assert all(g.abs().sum() > 0 for g in grads_r)  # every weight takes part
    assert (
        _rel(torch.cat([g.flatten() for g in grads_f]), torch.cat([g.flatten() for g in grads_r]))
        < grad_tol
    )


def test_bf16_training_step_matches_fp32_reference(tmp_path: Path) -> None:
    _assert_step_close(_trainer(tmp_path, "bf16"), _trainer(tmp_path, "fp32"), 5e-3, 2e-2)


def test_training_step_reference_is_deterministic(tmp_path: Path) -> None:
    """The comparison above can only pass for the right reason: equal seeds give equal steps,
    and a different step (another noise draw) is far outside the tolerance."""
    a, b = _trainer(tmp_path / "a", "fp32"), _trainer(tmp_path / "b", "fp32")
    loss_a, grads_a, weights_a = _one_step(a)
    loss_b, grads_b, weights_b = _one_step(b)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(x, y) for x, y in zip(grads_a + weights_a, grads_b + weights_b))
    images, labels = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (8,))
    other = b.train_step(5, images, labels)["denoise"]
    assert abs(other.item() - loss_a.item()) > 5e-3 * loss_a.item()


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path: Path) -> None:
    torch._dynamo.reset()
    _assert_step_close(_trainer(tmp_path, "fp32", True), _trainer(tmp_path, "fp32"), 1e-5, 1e-4)


# --------------------------------------------------------------------------- sampling


def _sampler_setup() -> tuple[nn.Module, DenoisingObjective, Tensor, Tensor]:
    net = _randomize(build_model("JiT-Micro")).eval()
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), num_classes=10)
    labels = torch.tensor([0, 3, 7, 9])
    return net, objective, labels, noise_for(0, 4, (3, 16, 16), 1.0, "cpu")


def _generate(net, objective, labels, noise, interval=(0.1, 1.0)) -> Tensor:
    return generate(net, objective.velocity, labels, noise, null_class=10, steps=50,
                    cfg_scale=2.0, interval=interval)  # fmt: skip


def test_bf16_sampling_run_matches_fp32_reference() -> None:
    net, objective, labels, noise = _sampler_setup()
    ref = _generate(net, objective, labels, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _generate(net, objective, labels, noise)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert _rel(fast, ref) < 1.5e-2  # measured 5e-3 on AVX2 (bf16 emulated)
    other = _generate(net, objective, labels.roll(1), noise)  # what a real error looks like
    assert _rel(other, ref) > 3e-2


def test_bench_sampling_workload_is_generate() -> None:
    net, objective, labels, noise = _sampler_setup()
    work = SampleWorkload(net, objective, labels, noise, 50, 2.0, (0.1, 1.0), bf16=False)
    assert torch.equal(work(), _generate(net, objective, labels, noise))
    assert work.images_evaluated == 4 * (99 + 88)


@pytest.mark.slow
def test_compiled_sampling_run_matches_eager() -> None:
    torch._dynamo.reset()
    net, objective, labels, noise = _sampler_setup()
    ref = _generate(net, objective, labels, noise)
    fast = _generate(compile_for_sampling(net), objective, labels, noise)
    assert _rel(fast, ref) < 1e-4


def test_cfg_interval_skips_the_unconditional_pass_outside_it() -> None:
    """Heun-50 evaluates at t = i/50 (i = 0…49) and t = j/50 (j = 1…49): 99 calls. Inside
    (0.1, 1) — i, j = 6…49, 44 + 44 times — the call carries the conditional and the
    unconditional batch together; at t ≤ 0.1 (11 calls) only the conditional batch."""
    net, objective, labels, noise = _sampler_setup()
    calls: list[Tensor] = []
    net.register_forward_pre_hook(lambda _m, args: calls.append(args[2].clone()))
    _generate(net, objective, labels, noise, interval=(0.1, 1.0))
    skipped = [y for y in calls if len(y) == 4]
    both = [y for y in calls if len(y) == 8]
    assert len(calls) == 99 and len(skipped) == 11 and len(both) == 88
    assert all((y != 10).all() for y in skipped)  # no unconditional rows outside
    assert all(torch.equal(y[:4], labels) and (y[4:] == 10).all() for y in both)
    calls.clear()
    _generate(net, objective, labels, noise, interval=(0.0, 1.0))  # guidance at every t < 1
    rows_everywhere = sum(len(y) for y in calls)
    assert rows_everywhere - 4 * (99 + 88) == 11 * 4


# --------------------------------------------------------------------------- bench command


def test_matmul_ceiling_respects_its_size_cap() -> None:
    out = matmul_ceiling(torch.device("cpu"), torch.float32, max_size=256, min_seconds=1e-3)
    assert (
        out["size"] == 256
        and out["gflops_per_s"] == max(out["gflops_per_s_by_layout"].values()) > 0
    )


def test_bench_all_writes_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "JiT-Micro", "--batch", "4", "--dtype", "fp32", "--what", "all",
            "--threads", "1", "--warmup", "1", "--repeats", "2", "--sample-steps", "3",
            "--sample-repeats", "1", "--matmul-max-size", "256", "--out", str(tmp_path)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result) == {
        "config", "dtype_choice", "machine", "model", "ceiling", "train", "sample", "summary"
    }  # fmt: skip
    assert result["dtype_choice"] == "fp32: as requested"
    for key in ("date", "torch", "torch_threads", "cpu", "load_average", "load_average_end"):
        assert key in result["machine"], key
    assert {"model", "logical_cpus", "isa_flags"} <= set(result["machine"]["cpu"])
    assert (
        result["model"]["train_gflops_per_image"] == 3 * result["model"]["forward_gflops_per_image"]
    )
    train, sample = result["train"], result["sample"]
    for key in ("images_per_s", "tokens_per_s", "mfu", "peak_memory_mib"):
        assert train[key] > 0 and sample.get(key, 1) > 0, key
    assert len(train["steps_s"]) == 2 and len(sample["runs_s"]) == 1
    # Heun-3 evaluates at t = 0 (outside the interval: 1 pass) and 1/3, 1/3, 2/3, 2/3 (2 passes)
    assert sample["nfe"] == 5 and sample["network_evals_per_image"] == 9
    assert capsys.readouterr().out.strip().splitlines()[-1] == result["summary"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "JiT-Q/4"], "unknown model 'JiT-Q/4'"),
        (["--cfg-scale", "1"], "cfg_scale=1.0 disables guidance"),
        (["--model", "JLT-B/2"], "bench runs pixel models"),
    ],
)
def test_bench_rejects_bad_arguments(argv, message, tmp_path, capsys) -> None:
    assert bench_main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize(
    ("flags", "native", "why"),
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, False, "neither AMX nor AVX512"),
        ({"avx2": True, "avx512_bf16": True, "amx_bf16": False}, True, "AVX512-BF16"),
        ({"avx2": True, "avx512_bf16": True, "amx_bf16": True}, True, "AMX"),
        ({"avx2": False, "avx512_bf16": False, "amx_bf16": False}, False, "unreadable"),
    ],
)
def test_native_bf16_reads_the_cpu_flags(flags, native, why) -> None:
    from denoiselab.bench.machine import native_bf16

    got, reason = native_bf16(torch.device("cpu"), flags)
    assert got is native and why in reason


def test_bench_dtype_auto_follows_this_machine_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No --dtype: bf16 exactly where this machine's CPU flags promise native bf16, and the
    choice with its reason is printed and recorded."""
    from denoiselab.bench.machine import cpu_facts

    flags = cpu_facts()["isa_flags"]
    expected = "bf16" if flags["amx_bf16"] or flags["avx512_bf16"] else "fp32"
    argv = ["--model", "JiT-Micro", "--batch", "2", "--what", "train", "--threads", "1",
            "--warmup", "0", "--repeats", "1", "--matmul-max-size", "128", "--out", str(tmp_path)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    torch_name = {"bf16": "bfloat16", "fp32": "float32"}[expected]
    assert result["config"]["dtype"] == expected and result["ceiling"]["dtype"] == torch_name
    assert result["dtype_choice"].startswith(f"auto → {expected}: ")
    assert f"dtype auto → {expected}: " in capsys.readouterr().err


# --------------------------------------------------------------------------- step breakdown


class _FakeClock:
    """Advances by one per reading, and by ``advance(dt)`` for simulated work: a phase's
    total counts its laps plus the work done inside it."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, dt: float) -> None:
        self.now += dt

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_phase_clock_charges_each_interval_to_the_phase_that_ends_it() -> None:
    times = iter([10.0, 10.5, 12.0, 12.25, 13.0, 15.0])
    clock = PhaseClock(clock=lambda: next(times))
    clock.start()  # 10.0
    clock.lap("data")  # 0.5
    clock.lap("forward")  # 1.5
    clock.lap("data")  # 0.25 more
    clock.lap("ema")  # 0.75
    phases = clock.stop()  # the tail, 2.0, is bookkeeping
    assert list(phases) == list(PHASES)
    assert phases == {"data": 0.75, "forward": 1.5, "loss": 0.0, "backward": 0.0,
                      "optimizer": 0.0, "ema": 0.75, "bookkeeping": 2.0}  # fmt: skip
    assert sum(phases.values()) == 15.0 - 10.0
    with pytest.raises(ValueError, match="unknown step phase 'fwd'"):
        clock.lap("fwd")


def test_train_step_laps_every_phase_and_timing_changes_nothing(tmp_path: Path) -> None:
    """The clock ticks once per reading, and the network, the optimizer step and the EMA
    update each advance it by a distinct amount of simulated work. Per micro-batch there is
    one lap for seeding, data, forward and backward and two for the loss (before and after
    the network); per step one for the optimizer, EMA and the bookkeeping after the
    micro-batches and after the last lap; and each piece of work lands in its own phase.
    The timed step equals an untimed one."""
    cfg = replace(bench_train_config("JiT-Micro", None, 8, "fp32", False, "cpu"), grad_accum=2)
    timed, plain = (Trainer(cfg, tmp_path / name, quiet=True) for name in ("timed", "plain"))
    fake = _FakeClock()
    clock = PhaseClock(clock=fake)
    timed.step_clock = clock

    def working(fn, dt):
        def call(*args, **kwargs):
            fake.advance(dt)
            return fn(*args, **kwargs)

        return call

    timed.module.__dict__["net"] = TimedNet(working(timed.module.net, 1e4), clock)
    timed.optimizer.step = working(timed.optimizer.step, 1e3)
    timed.ema.update = working(timed.ema.update, 1e2)
    images, labels = torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % 10
    clock.start()
    out_t = timed.train_step(3, images, labels)
    phases = clock.stop()
    assert phases == {"data": 2, "forward": 2 + 2e4, "loss": 4, "backward": 2,
                      "optimizer": 1 + 1e3, "ema": 1 + 1e2, "bookkeeping": 4}  # fmt: skip
    out_p = plain.train_step(3, images, labels)
    assert torch.equal(out_t["denoise"], out_p["denoise"])
    assert all(
        torch.equal(a, b) for a, b in zip(timed.model.parameters(), plain.model.parameters())
    )


def test_breakdown_summary_medians_shares_and_floor() -> None:
    steps = [dict.fromkeys(PHASES, 0.001) | {"forward": f} for f in (0.010, 0.050, 0.020)]
    out = summarise(steps, [0.012, 0.011, 0.019], "perf_counter")
    assert out["phases_ms"]["forward"] == pytest.approx(20.0)  # medians, not means
    assert out["step_ms"] == pytest.approx(26.0)  # median of 16, 56, 26
    assert out["phase_share"]["forward"] == pytest.approx(20 / 26)
    assert out["bare_step_ms"] == pytest.approx(12.0) and out["overhead_ms"] == pytest.approx(14.0)


def test_bench_breakdown_times_every_phase_of_the_real_step(tmp_path: Path, capsys) -> None:
    argv = ["--model", "JiT-Micro", "--batch", "4", "--dtype", "fp32", "--what", "train",
            "--threads", "1", "--warmup", "1", "--repeats", "3", "--matmul-max-size", "256",
            "--breakdown", "--out", str(tmp_path)]  # fmt: skip
    assert bench_main(argv) == 0
    b = json.loads((tmp_path / "bench.json").read_text())["train"]["breakdown"]
    assert set(b["phases_ms"]) == set(PHASES) and b["repeats"] == 3
    assert all(v >= 0 for v in b["phases_ms"].values())
    assert all(b["phases_ms"][p] > 0 for p in ("forward", "loss", "backward", "optimizer", "ema"))
    # the phases decompose the step: their medians add up to about the median step
    assert 0.5 < sum(b["phases_ms"].values()) / b["step_ms"] < 2.0
    assert len(b["steps_s"]) == len(b["bare_steps_s"]) == 3 and b["bare_step_ms"] > 0
    assert b["overhead_ms"] == pytest.approx(b["step_ms"] - b["bare_step_ms"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train step breakdown") and out[-1].startswith("bench JiT-Micro")
    assert any(line.split()[:1] == ["bare"] for line in out)


def test_bench_breakdown_needs_the_training_workload(tmp_path: Path, capsys) -> None:
    assert bench_main(["--what", "sample", "--breakdown", "--out", str(tmp_path)]) == 2
    assert "breakdown splits the training step" in capsys.readouterr().err
