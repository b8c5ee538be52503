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

OUTRO_SWEEP = """
A sweep over timm's ViT-like models (`python tools/support_sweep.py`: every `vit_*`, `deit*`,
`beit*`, `eva*`, `flexivit*` name up to base/medium size, random init, keep 0.7, one forward pass;
timm 1.0.31): 111 models, 103 patched and ran, 8 refused with a reason (PE's `'map'` head on an
EVA; parallel `*_18x2_*`, `*_xp_*`, `*_pwee_*` blocks; differential-attention `*_dlittle_*`,
`*_dwee_*`, `*_dpwee_*` blocks), none failed any other way. (The three SigLIP `'map'` models in it,
refused before attention pools were served, were re-run alone: `--names 'vit_*siglip*'`.)

"""

OUTRO_ADD = """A family that is not here can be added in one file: see [Adding a model family](adding-a-family.md).
"""


DISCOVERED_INTRO = """## Discovered

A model no family claims is read by structural discovery (its blocks, prefix tokens and readout,
from one forward pass; see [Adding a model family](adding-a-family.md), "When no family claims a
model"), and `explain` then says `family=discovered`. What was tried (`tests/test_discovery.py`,
`tests/test_discovery_refusals.py`; random init, float64; keep 0.7 at blocks 0 and 1 of 3, EViT and
`method="merge"`; keep 1.0 compared with the original):

"""
DISCOVERED = [
    (
        "hand-written ViT, `q @ k.transpose(-2, -1)` softmax attention",
        "patched; keep 1.0 bitwise; equal to timm's ViT with its weights (1e-9)",
    ),
    (
        "the same with an `nn.Softmax` module, `torch.einsum`, einops `rearrange` (function or "
        "`Rearrange` layer), separate q/k/v projections with SDPA",
        "patched; keep 1.0 bitwise; equal to timm's ViT (1e-9)",
    ),
    (
        "the same with `nn.MultiheadAttention` (batch-first or sequence-first)",
        "patched (re-expressed with SDPA on the same parameters); keep 1.0 equal up to rounding",
    ),
    (
        "the same with post-norm blocks",
        "patched; keep 1.0 bitwise; equal to an explicit EViT reference (1e-9)",
    ),
    (
        "vit-pytorch `ViT` (`pool='cls'` or `'mean'`) and `SimpleViT`",
        "patched (residual adds in `Transformer.forward`: blocks restructured on the copy); keep 1.0 bit"
        "wise; EViT equal to an explicit reference",
    ),
    (
        "a DINO-style ViT (`vision_transformer.py`'s structure)",
        "patched; keep 1.0 bitwise; equal to timm's ViT; `get_last_selfattention` refused at call time",
    ),
    (
        "MAE-style ViTs (`models_vit.py`: a timm subclass), `global_pool=False` and `True`",
        "patched (class token; mean of the image tokens with `fc_norm`); equal to timm's `'token'` / `'avg'` ViT",
    ),
    (
        "timm ViT with peft LoRA, `model.get_base_model()`",
        "patched (LoRA layers traced as whole projections); keep 1.0 bitwise; the `PeftModel` itself gets a hint",
    ),
    (
        "a ViT that returns its tokens, max-pools or sums them; residual adds in the model's own `forward`",
        "refused by name, with what was found",
    ),
    (
        "a CNN; a module that takes no image",
        "refused: not a vision transformer, with what was found and what was not",
    ),
]
"""What structural discovery was tried on, and the result (the tests hold each row)."""


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
    tried = ["| model | result |", "| --- | --- |", *(f"| {model} | {result} |" for model, result in DISCOVERED)]
    return INTRO + "\n".join(rows) + "\n" + OUTRO_SWEEP + DISCOVERED_INTRO + "\n".join(tried) + "\n\n" + OUTRO_ADD


def on_files(files, config):
    # docs/supported-models.md is committed too, so that links to it work outside the built site
    # (tests/test_docs.py keeps it equal to render()); the build always uses a fresh render.
    committed = files.get_file_from_path(PAGE)
    if committed is not None:
        files.remove(committed)
    files.append(File.generated(config, PAGE, content=render()))
    return files
