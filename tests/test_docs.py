"""The documentation site builds with ``mkdocs build --strict`` (any warning or broken link fails),
and its supported-models page is generated from the registry."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import evit_patch

pytestmark = pytest.mark.xdist_group("docs")  # one worker: the module fixture is built once

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = [m for m in NEEDED if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"docs tools not installed ({', '.join(missing)}): pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_docs_build_strict(site):
    pages = {p.parent.name for p in site.glob("*/index.html")}
    assert {"how-it-works", "api", "supported-models", "visualisation", "faq", "adding-a-family", "deployment"} <= pages
    api = (site / "api" / "index.html").read_text()
    deployment = ("evit_patch.save_pretrained", "evit_patch.load_pretrained", "evit_patch.push_to_hub")
    deployment += ("evit_patch.export_program", "evit_patch.export_onnx")
    for name in ("evit_patch.apply", "evit_patch.visualize", "evit_patch.track_tokens", *deployment):
        assert f'id="{name}"' in api, name


def test_supported_models_page_lists_every_registered_family(site):
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "supported-models" / "index.html").read_text()))
    entries = evit_patch.list_supported()
    assert any(e.supported for e in entries) and any(not e.supported for e in entries)
    for entry in entries:
        status = "supported" if entry.supported else "refused"
        assert f"\n{entry.family}\n{status}\n{entry.notes}\n" in text, entry.family
