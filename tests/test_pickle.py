"""Whole patched models survive ``pickle`` and ``torch.save``/``torch.load(weights_only=False)`` (issue 15,
item 6). Every family's pickle round trip, for EViT and merging, is in test_families.py."""

from __future__ import annotations

import io

import torch
from cases import small_beit
from conftest import images, make_vit
from tracked import check_pickle

import evit_patch


def test_pickle_round_trip_with_an_explicit_softmax():
    """Token state modules and the size bias stay opaque when pickle re-traces the blocks."""
    model = make_vit(img_size=64, depth=4, num_classes=10)
    for block in model.blocks:
        block.attn.fused_attn = False
    check_pickle(model, images(2, size=64), method="merge")


def test_torch_save_round_trip():
    fast = evit_patch.apply(small_beit(), layers=[1, 2], keep=0.5)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = images(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)
