"""Latency mode (batch 1): top-k runs per sample, so an image's output does not depend on its batch."""

from __future__ import annotations

import torch
from conftest import images, make_vit

import evit_patch
from evit_patch.analysis.tracking import track_tokens


def _narrow_deit():
    """DeiT-Tiny's 196 tokens and 12 blocks at a third of its width: top-k sees the same token counts."""
    return make_vit(embed_dim=64, num_heads=4)


def test_batch_of_one_equals_its_row_in_any_batch():
    fast = evit_patch.apply(_narrow_deit(), layers=[3, 6, 9], keep=0.5)
    x = images(4)
    with torch.no_grad():
        batched = fast(x)
        singles = torch.cat([fast(x[i : i + 1]) for i in range(4)])
        shuffled = fast(x.flip(0)).flip(0)
    torch.testing.assert_close(singles, batched, rtol=0, atol=1e-12)
    torch.testing.assert_close(shuffled, batched, rtol=0, atol=1e-12)


def test_each_image_keeps_the_same_tokens_alone_or_batched():
    fast = evit_patch.apply(_narrow_deit(), layers=[3, 6, 9], keep=0.5)
    x = images(3)
    batched = track_tokens(fast, x)
    for i in range(3):
        alone = track_tokens(fast, x[i : i + 1])
        for stage_alone, stage_batched in zip(alone.stages, batched.stages, strict=True):
            assert torch.equal(stage_alone.kept_index[0], stage_batched.kept_index[i]), (i, stage_alone.layer)
    # the images differ, so what they keep differs: the test would catch a shared selection
    assert not torch.equal(batched.stages[0].kept_index[0], batched.stages[0].kept_index[1])
