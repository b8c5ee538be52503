"""The documentation site builds with ``mkdocs build --strict`` (any warning or broken link fails),
and its supported-models page is generated from the registry."""

from __future__ import annotations

import html
import importlib.util
import logging
import re
from pathlib import Path

import pytest

import evit_patch

pytestmark = pytest.mark.xdist_group("docs")  # one worker: the module fixture is built once

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``mkdocs build --strict``, in this process (it has evit_patch, which the supported-models hook
    imports, loaded already): any warning on mkdocs' logger fails, as ``--strict`` does."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"docs tools not installed ({', '.join(missing)}): pip install -e '.[dev]'")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    out = tmp_path_factory.mktemp("site")
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logger = logging.getLogger("mkdocs")
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("NO_MKDOCS_2_WARNING", "1")
            patch.chdir(ROOT)
            try:
                build(load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(out)))
            except Abort as error:
                pytest.fail(f"{error}: {[r.getMessage() for r in warnings]}")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in warnings] == []
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
