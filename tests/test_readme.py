"""The README's first screen stays true: two set-up commands, CI runs the second verbatim,
the quickstart it names exists, and the pictures it shows are in the repository."""

from __future__ import annotations

import re
from pathlib import Path

from denoiselab.config import find_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
VENV = "python3 -m venv .venv && . .venv/bin/activate && "


def _setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands_in_a_virtual_environment():
    main_job, tests = _setup_commands()
    for command in (main_job, tests):  # PEP 668 systems refuse pip outside a venv
        assert command.startswith(VENV), command
    assert "denoiselab train quickstart" in main_job and find_config("quickstart").is_file()
    assert tests.endswith("python -m pytest -q") and '-e ".[test]"' in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [ln for ln in ci if ln.strip() and not ln.lstrip().startswith(("#", "set ", "cd ",
                                                                             "export "))]  # fmt: skip
    assert commands == [_setup_commands()[1]]


def test_readme_says_how_to_get_the_cpu_wheel_and_skip_slow_tests():
    assert "--index-url https://download.pytorch.org/whl/cpu" in README
    assert '-m "not slow"' in README
    assert '"slow: ' in (ROOT / "pyproject.toml").read_text()  # the marker is declared


def test_pictures_the_readme_shows_are_committed_and_small():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", README)
    assert {"docs/quickstart_grid.png", "docs/quickstart_eval.png"} <= set(pictures)
    for picture in pictures:
        path = ROOT / picture
        assert path.is_file() and path.stat().st_size < 200_000, picture
