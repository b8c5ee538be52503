"""mkdocs hook: write supported-models.md from the family registry at every build, so it cannot go stale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
PAGE = "supported-models.md"

INTRO = """# Supported models

This page is generated from the family registry at every docs build
(`docs/hooks/supported_models.py` calls `evit_patch.list_supported()`), so it always matches the
code. A model is matched by the first family whose `matches` accepts it; a supported family may
still refuse one configuration of a model, with a message that says why (see the
[FAQ](faq.md#why-was-my-model-refused)).

```python
import evit_patch

for entry in evit_patch.list_supported("timm.*"):
    print(entry.family, entry.supported, entry.notes)
```

"""

OUTRO = """
A sweep over timm's ViT-like models (`python tools/support_sweep.py`: every `vit_*`, `deit*`,
`beit*`, `eva*`, `flexivit*` name up to base/medium size, random init, keep 0.7, one forward pass;
timm 1.0.31): 111 models, 103 patched and ran, 8 refused with a reason (PE's `'map'` head on an
EVA; parallel `*_18x2_*`, `*_xp_*`, `*_pwee_*` blocks; differential-attention `*_dlittle_*`,
`*_dwee_*`, `*_dpwee_*` blocks), none failed any other way. (The three SigLIP `'map'` models in it,
refused before attention pools were served, were re-run alone: `--names 'vit_*siglip*'`.)

A family that is not here can be added in one file: see [Adding a model family](adding-a-family.md).
"""


def _cell(text: str) -> str:
    """Plain text in a table cell: markdown's special characters escaped (``vit_*`` is not emphasis)."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text.replace("\n", " "))


def render() -> str:
    """The page's markdown, from the registry of the checkout being built (not an installed copy)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import evit_patch

    rows = ["| family | status | notes |", "| --- | --- | --- |"]
    for entry in evit_patch.list_supported():
        status = "supported" if entry.supported else "refused"
        rows.append(f"| `{entry.family}` | {status} | {_cell(entry.notes)} |")
    return INTRO + "\n".join(rows) + "\n" + OUTRO


def on_files(files, config):
    # docs/supported-models.md is committed too, so that links to it work outside the built site
    # (tests/test_docs.py keeps it equal to render()); the build always uses a fresh render.
    committed = files.get_file_from_path(PAGE)
    if committed is not None:
        files.remove(committed)
    files.append(File.generated(config, PAGE, content=render()))
    return files
