"""The docs say what the code does, and their links work outside the built site too (issue 15, item 17)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from cases import small_hf
from conftest import images

import evit_patch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _hook():
    spec = importlib.util.spec_from_file_location(
        "supported_models_hook", ROOT / "docs" / "hooks" / "supported_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_supported_models_page_is_current():
    assert (ROOT / "docs" / "supported-models.md").read_text() == _hook().render(), (
        "regenerate docs/supported-models.md from docs/hooks/supported_models.py render()"
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve_in_the_repository(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link {target} points to nothing"


def test_keep_one_promise_names_torchvision_rounding():
    for page in ("index.md", "faq.md"):
        for paragraph in (ROOT / "docs" / page).read_text().split("\n\n"):
            if "`keep=1.0` is bitwise identical to the original" in paragraph:
                assert "torchvision" in paragraph and "3e-5" in paragraph, f"{page}: {paragraph[:200]}"
    supported = {e.family: e.notes for e in evit_patch.list_supported()}
    assert "not bitwise" in supported["torchvision.VisionTransformer"]


def test_transformers_other_input_sizes_work_as_the_faq_says():
    assert "`interpolate_pos_encoding=True`" in (ROOT / "docs" / "faq.md").read_text()
    model = small_hf()
    fast = evit_patch.apply(model, layers=[1], keep=1.0)
    x = images(2, size=96)
    with torch.no_grad():
        got = fast(x, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(got, model(x, interpolate_pos_encoding=True).logits, rtol=0, atol=0)
