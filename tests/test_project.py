"""Project guards: the README's commands, CI, and the public API."""

from __future__ import annotations

import re
from pathlib import Path

import evit_patch

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(.+?)\s+#", readme.split("```bash", 1)[1].split("```", 1)[0], flags=re.M)
    assert len(commands) == 2 and "tools/demo.py" in commands[0] and "pytest" in commands[1]
    test_command = commands[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_public_names():
    assert {"apply", "explain", "set_keep", "get_config", "list_supported", "EViTConfig"} <= set(evit_patch.__all__)
    assert all(hasattr(evit_patch, name) for name in evit_patch.__all__)
