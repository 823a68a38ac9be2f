"""The `denoiselab` command: info for every preset, errors that name the bad input."""

from __future__ import annotations

import subprocess
import sys

from denoiselab.cli import main
from denoiselab.models.registry import MODEL_PRESETS


def test_info_every_preset(capsys):
    assert main(["info", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count("params: ") == len(MODEL_PRESETS)
    assert "== JiT-G/16" in out and "params: 2007.1M" in out


def test_info_b16_matches_paper(capsys):
    assert main(["info", "JiT-B/16"]) == 0
    out = capsys.readouterr().out
    assert "params: 131.1M" in out and "25.2" in out


def test_info_unknown_model_lists_valid(capsys):
    assert main(["info", "JiT-Q/3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "unknown model 'JiT-Q/3'; valid names: JiT-B/16" in err


def test_unknown_override_syntax_is_rejected(capsys):
    assert main(["train", "quickstart", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --bogus" in err


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "denoiselab", "info", "JiT-T/4"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "params: 4.2M" in proc.stdout, proc.stderr


def test_a_torchrun_process_exits_with_its_status_and_all_its_output():
    """Under torchrun (WORLD_SIZE > 1) the entry point ends through ``end_process``
    (``os._exit``, no interpreter teardown): stdout is still complete and the exit status
    is the command's, for success, bad input and a crash alike."""
    env = {**__import__("os").environ, "WORLD_SIZE": "2"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "denoiselab", *args], capture_output=True,
                              text=True, env=env)  # fmt: skip

    ok = run("info", "JiT-T/4")
    assert ok.returncode == 0 and "params: 4.2M" in ok.stdout, ok.stderr
    bad = run("info", "JiT-Q/3")
    assert bad.returncode == 2 and "JiT-T/4" in bad.stderr, bad.stderr  # names valid presets
    usage = run("--no-such-flag")
    assert usage.returncode == 2 and "error:" in usage.stderr, usage.stderr


def test_end_process_flushes_and_exits_with_the_code():
    code = (
        "import sys\nfrom denoiselab.train.distributed import end_process\n"
        "print('kept', end='')\nsys.stderr.write('also kept')\nend_process(3)\n"
        "print('never')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "kept", "also kept")
