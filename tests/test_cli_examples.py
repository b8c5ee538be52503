"""Every command line the docs and ``--help`` texts show parses, and its --keep fits its --layers
(issue 15, items 2 and 16: ``evaluate --keep 0.9 0.7`` with three layers failed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from evit_patch import cli
from evit_patch.commands import common

ROOT = Path(__file__).resolve().parents[1]


def _examples() -> list[tuple[str, str]]:
    """``(where, command line)`` for each ``evit-patch CMD ...`` / ``python tools/CMD.py ...`` example."""
    import importlib

    texts = {
        str(p.relative_to(ROOT)): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    }
    for name in cli.COMMANDS:
        texts[f"evit_patch/commands/{name}.py"] = importlib.import_module(f"evit_patch.commands.{name}").__doc__
    texts["evit_patch/cli.py"] = cli.__doc__
    found = []
    for where, text in texts.items():
        joined = re.sub(r"\\\\?\n\s*", " ", text)  # continuation lines, raw or escaped in a docstring
        for match in re.finditer(r"(?:evit-patch|python tools/(\w+)\.py)((?: [^\n#`|]*)?)", joined):
            tool, rest = match.group(1), match.group(2).strip()
            line = f"{tool} {rest}" if tool else rest
            words = line.split()
            if not words or words[0] not in cli.COMMANDS or {"...", "--help"} & set(words) or "[" in line:
                continue
            found.append((where, line))
    return found


EXAMPLES = _examples()


def test_examples_are_found():
    commands = {line.split()[0] for _, line in EXAMPLES}
    assert {"explain", "export", "evaluate", "finetune", "visualize", "plan", "benchmark"} <= commands


@pytest.mark.parametrize(("where", "line"), EXAMPLES, ids=[f"{w}:{line[:40]}" for w, line in EXAMPLES])
def test_example_parses_and_its_keep_fits_its_layers(where, line, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # examples may say --device cuda
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    args = cli.build_parser().parse_args(shlex.split(line))
    keep, layers = getattr(args, "keep", None), getattr(args, "layers", None)
    if isinstance(keep, list) and len(keep) > 1 and not getattr(args, "sweep", False):
        assert layers is not None and len(keep) == len(layers), (
            f"{where}: {line!r} gives {len(keep)} keep rates for {len(layers)} layers"
        )


def test_evaluate_help_says_what_several_keep_rates_mean():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["evaluate"]
    assert "evit-patch evaluate" in sub.description and "--sweep" in sub.description
    helps = {a.dest: a.help for a in sub._actions}
    assert "one plan: one rate per --layers entry" in helps["sweep"]
    assert common.keep_arg(cli.build_parser().parse_args(["evaluate", "--data", "x", "--keep", "0.5"])) == 0.5
