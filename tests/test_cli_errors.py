"""Every `denoiselab` error path a user can hit with bad input: one line on stderr naming the
problem, exit status 2, no traceback — for every subcommand, the passthrough ones included."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from denoiselab.cli import main
from denoiselab.config import CONFIG_DIR as CONFIGS  # the shipped configs

QUICK = str(CONFIGS / "quickstart.yaml")
TINY = {
    "data": {"name": "shapes", "image_size": 16, "num_images": 16},
    "model": {"name": "JiT-Micro"},
    "objective": {"noise_scale": 1.0},
    "ema": {"decays": [0.9]},
    "sample": {"steps": 1, "num_grid": 2},
    "global_batch": 8,
    "duration_nimg": 8,
    "log_every_nimg": 8,
    "sample_every_nimg": 8,
    "ckpt_every_nimg": 8,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A one-step run, a config, and broken files to point the commands at."""
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(root / "run")]) == 0
    (root / "bad.yaml").write_text("data: [1, 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "junk").mkdir()
    (root / "junk" / "step_000000003.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    (root / "afile").write_text("x")
    return {
        "run": str(root / "run"), "cfg": str(cfg), "bad": str(root / "bad.yaml"),
        "list": str(root / "list.yaml"), "junk": str(root / "junk"), "afile": str(root / "afile"),
        "out": str(root / "out"),
    }  # fmt: skip


# (argv with {placeholders}, a fragment the one line must contain)
BAD = [
    # top level and `info`
    ([], "required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["info", "JiT-Q/3"], "unknown model 'JiT-Q/3'; valid names: JiT-B/16"),
    (["info", "JiT-B/16", "--image-size", "100"], "image_size=100 is not divisible"),
    (["info", "JiT-B/16", "--image-size", "abc"], "invalid int value: 'abc'"),
    # train: config files, overrides, values
    (["train"], "give a CONFIG: a YAML file or a shipped config"),
    (["train", "{out}/nope.yaml"], "nope.yaml' not found: neither a file nor a shipped config"),
    (["train", "{bad}", "--dry-run"], "is not valid YAML"),
    (["train", "{list}", "--dry-run"], "mapping at the top level"),
    (["train", QUICK, "--dry-run", "model.widht=3"], "unknown key 'widht' in model; valid keys"),
    (["train", QUICK, "--dry-run", "model.name=JiT-Q/3"], "valid: JiT-B/16"),
    (["train", QUICK, "--dry-run", "model.depth=abc"], "model.depth='abc': expected an integer"),
    (["train", QUICK, "--dry-run", "model.num_heads=3"], "not divisible by num_heads=3"),
    (["train", QUICK, "--dry-run", "optim.lrr=1"], "unknown key 'lrr' in optim"),
    (["train", QUICK, "--dry-run", "optim.lr=abc"], "optim.lr='abc'"),
    (["train", QUICK, "--dry-run", "optim.lr=[1"], "is not valid YAML"),
    (["train", QUICK, "--dry-run", "=3"], "must look like key.sub=value"),
    (["train", QUICK, "--dry-run", "optim.lr"], "unrecognized arguments: optim.lr"),
    (["train", QUICK, "--dry-run", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", QUICK, "--dry-run", "data.image_size=7"], "data.image_size=7"),
    (["train", QUICK, "--dry-run", "device=gpu"], "device='gpu' is not a device"),
    (["train", QUICK, "--dry-run", "grad_accum=3"], "divisible by grad_accum=3"),
    (["train", QUICK, "--dry-run", "objective.noise_scale=-1"], "noise_scale=-1"),
    (["train", QUICK, "--dry-run", "--steps", "0"], "duration_nimg=0"),
    (
        ["train", "{cfg}", "--out", "{out}/x", "data.name=imagefolder", "data.root={out}/none"],
        "does not exist",
    ),
    (["train", "--resume", "{out}/missing"], "does not exist"),
    (["train", "--auto-resume", "--resume", "{run}"], "--auto-resume takes a CONFIG"),
    (["train", "--resume", "{junk}"], "is corrupt or truncated"),
    # sample
    (["sample", "{out}/missing", "--out", "{out}/s"], "does not exist"),
    (["sample", "{afile}", "--out", "{out}/s"], "is not a checkpoint"),
    (["sample", "{run}", "--out", "{out}/s", "--num", "0"], "--num 0 must be >= 1"),
    (["sample", "{run}", "--out", "{out}/s", "--steps", "0"], "--steps 0 must be >= 1"),
    (["sample", "{run}", "--out", "{out}/s", "--batch", "0"], "--batch 0 must be >= 1"),
    (["sample", "{run}", "--out", "{out}/s", "--cfg-interval", "0.5", "0.1"], "--cfg-interval"),
    (["sample", "{run}", "--out", "{out}/s", "--device", "gpu"], "'gpu' is not a device"),
    (["sample", "{run}", "--out", "{out}/s", "--ema", "0.5"], "ema=0.5 not in checkpoint"),
    (["sample", "{run}", "--out", "{out}/s", "--class", "8"], "--class 8 is out of range"),
    (["sample", "{run}", "--out", "{afile}/s", "--num", "1", "--steps", "1"], "Not a directory"),
    (["sample", "{run}", "--solver", "rk4", "--out", "{out}/s"], "invalid choice: 'rk4'"),
    # eval (all fail before any probe training)
    (["eval", "{out}/missing", "--out", "{out}/e"], "does not exist"),
    (["eval", "{run}", "--out", "{out}/e", "--metrics", "fid2"], "unknown metric(s) ['fid2']"),
    (["eval", "{run}", "--out", "{out}/e", "--num", "0"], "--num 0 must be >= 2"),
    (["eval", "{run}", "--out", "{out}/e", "--sweep-cfg", "1:x"], "LO:HI:STEP"),
    (
        ["eval", "{run}", "--out", "{out}/e", "--metrics", "fd_probe,pr_probe", "--num", "3"],
        "--num=3: pr_probe needs num >= 4 samples",
    ),
    (
        [
            "eval",
            "{run}",
            "--out",
            "{out}/e",
            "--metrics",
            "pr_probe",
            "--sweep-cfg",
            "1:2:1",
            "--sweep-num",
            "2",
        ],
        "--sweep-num=2: pr_probe needs num >= 4 samples",
    ),
    (["eval", "{run}", "--out", "{out}/e", "--ema", "0.5"], "ema=0.5 not in checkpoint"),
    (["eval", "{run}", "--out", "{out}/e", "--device", "gpu"], "'gpu' is not a device"),
    (
        ["eval", "{run}", "--out", "{out}/e", "--metrics", "fid", "--inception", "{out}/no.pth"],
        "not found",
    ),
    (["eval", "{junk}", "--out", "{out}/e"], "is corrupt or truncated"),
    (["eval", "--out", "{out}/e"], "required: run"),
    # ablate / report
    (["ablate"], "give a SUITE"),
    (["ablate", "nosuchsuite"], "neither a file nor a built-in suite"),
    (["ablate", "{bad}", "--dry-run"], "is not valid YAML"),
    (["ablate", "prediction_targets", "--set", "bogus=1", "--dry-run"], "unknown key 'bogus'"),
    (["ablate", "prediction_targets", "--devices", "gpu7", "--dry-run"], "'gpu7' is not a device"),
    (["ablate", "prediction_targets", "--only", "nosuch", "--out", "{out}/a"], "unknown variant"),
    (["report", "{out}/missing"], "is neither a suite folder"),
    # bench / toy / analyze
    (["bench", "--model", "JiT-Q/3", "--out", "{out}/b"], "unknown model 'JiT-Q/3'"),
    (["bench", "--device", "gpu", "--out", "{out}/b"], "'gpu' is not a device"),
    (["bench", "--batch", "0", "--out", "{out}/b"], "batch=0 must be >= 1"),
    (["toy", "--dims", "0", "--out", "{out}/t"], "need at least one D >= 2"),
    (["toy", "--pred", "z", "--out", "{out}/t"], "invalid choice: 'z'"),
    (["toy", "--steps", "0", "--dims", "2", "--out", "{out}/t"], "train_steps=0"),
    (["analyze"], "required: analysis"),
    (["analyze", "gaussian", "--spectrum", "bogus", "--out", "{out}/g"], "kind must be"),
    (["analyze", "gaussian", "--spectrum", "list:a,b", "--out", "{out}/g"], "takes numbers"),
    (["analyze", "gaussian", "--rank", "0", "--out", "{out}/g"], "--rank 0 must be >= 1"),
    (["analyze", "gaussian", "--t", "2", "--out", "{out}/g"], "must lie in (0, 1)"),
    (
        ["analyze", "gaussian", "--data", "shapes", "--patch", "5", "--out", "{out}/g"],
        "not divisible by patch=5",
    ),
    # latents
    (
        ["train-ae", "{out}/nope.yaml", "--out", "{out}/ae"],
        "not found: neither a file nor a shipped config",
    ),
    (["train-ae", "{bad}", "--out", "{out}/ae"], "is not valid YAML"),
    (["train-ae", "{cfg}", "--out", "{out}/ae", "--steps", "0"], "steps=0 must be >= 1"),
    (["train-ae", "{cfg}", "--out", "{out}/ae", "--seed", "-1"], "seed=-1 must be >= 0"),
    (["repa-e", "--autoencoder", "{run}", "--out", "{out}/r", "seed=-1"], "seed=-1 must be >= 0"),
    (["cache-latents", "{cfg}", "--out", "{out}/c"], "no autoencoder"),
    (
        [
            "cache-latents",
            "{cfg}",
            "--out",
            "{out}/c",
            "--autoencoder",
            "identity",
            "--device",
            "gpu",
        ],
        "'gpu' is not a device",
    ),
    (
        ["cache-latents", "{cfg}", "--out", "{out}/c", "--autoencoder", "identity", "--batch", "0"],
        "batch_size=0 must be >= 1",
    ),
    (
        ["cache-latents", "{cfg}", "--out", "{out}/c", "--autoencoder", "{out}/none"],
        "does not exist",
    ),
    (["cache-latents", "{cfg}", "--out", "{out}/c", "--autoencoder", "{run}"], "no config.json"),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit from inside main
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", BAD, ids=[" ".join(a)[:60] or "(none)" for a, _ in BAD])
def test_bad_invocation_is_one_line_and_exit_2(argv, fragment, files, capsys):
    code, err = _run([a.format(**files) for a in argv], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("denoiselab"), lines[0]
    assert fragment in lines[0], lines[0]


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only input errors are shortened; an unexpected exception still propagates."""
    import denoiselab.models.flops as flops

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(flops, "describe", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "JiT-B/16"])


def test_real_entry_point_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "denoiselab", "info", "JiT-Q/3"], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("denoiselab info: error: unknown model 'JiT-Q/3'; valid names:")
