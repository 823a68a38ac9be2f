"""The README's two set-up commands stay true: CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert "configs/quickstart.yaml" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_quickstart_config_exists():
    assert (ROOT / "configs" / "quickstart.yaml").is_file()
