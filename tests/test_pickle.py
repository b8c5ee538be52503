"""Whole patched models survive ``pickle`` and ``torch.save``/``torch.load(weights_only=False)`` (issue 15, item 6)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from conftest import images, make_vit
from test_beit import _small as small_beit
from test_eva import _small as small_eva
from test_hf import _small as small_hf
from test_torchvision import _small as small_torchvision

import evit_patch

MODELS = {
    "deit": (lambda: make_vit(img_size=64, depth=4, num_classes=10), 64),
    "vit_gap": (lambda: make_vit("vit_base_patch16_gap_224", img_size=64, depth=4, embed_dim=64, num_heads=4), 64),
    "beit": (small_beit, 64),
    "eva02": (small_eva, 56),
    "transformers": (small_hf, 64),
    "torchvision": (small_torchvision, 64),
}


def _output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _manual_attention_vit():
    model = make_vit(img_size=64, depth=4, num_classes=10)
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


@pytest.mark.parametrize(
    "name, method",
    [*((name, "evit") for name in MODELS), ("deit", "merge"), ("beit", "merge"), ("manual_attention", "merge")],
)
def test_pickle_round_trip(name, method):
    """Token state modules and the size bias stay opaque when pickle re-traces the blocks."""
    make, size = MODELS[name] if name in MODELS else (_manual_attention_vit, 64)
    fast = evit_patch.apply(make(), layers=[1, 2], keep=0.5, method=method)
    x = images(2, size=size)
    with torch.no_grad():
        expected = _output(fast, x)
        loaded = pickle.loads(pickle.dumps(fast))
        torch.testing.assert_close(_output(loaded, x), expected, rtol=0, atol=0)
    assert evit_patch.get_config(loaded) == evit_patch.get_config(fast)


def test_torch_save_round_trip():
    fast = evit_patch.apply(small_beit(), layers=[1, 2], keep=0.5)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = images(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)
