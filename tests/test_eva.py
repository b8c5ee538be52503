"""timm ``Eva`` (EVA-02, RoPE-ViT, DINOv3): rotary tables follow each surviving token's original
position. The shared checks run on EVA-02 in test_families.py; here, the other variants."""

from __future__ import annotations

import pytest
import torch
from cases import EVA_VARIANTS, eva_images, small_eva
from conftest import images, make_vit
from tracked import check_keep_one_is_exact, check_macs, check_matches_reference, check_permutation

import evit_patch
from evit_patch.reductions.base import Permutation


@pytest.mark.parametrize(
    "variant, fuse",
    [(v, fuse) for v in EVA_VARIANTS for fuse in (True, False) if (v, fuse) != ("eva02", True)],  # eva02: the table
)
def test_matches_reference(variant, fuse):
    check_matches_reference("eva", small_eva(variant), eva_images(variant), [1, 2], [0.6, 0.5], fuse)


def test_keep_one_is_exact_without_a_class_token():
    check_keep_one_is_exact(small_eva("rope_gap", torch.float32), eva_images("rope_gap", torch.float32))


def test_reordered_tokens_keep_their_mixed_rotation(monkeypatch):
    """Per-block ("mixed") RoPE tables: each block's rows follow the tokens."""
    check_permutation(small_eva("rope_mixed"), eva_images("rope_mixed"), monkeypatch, "gather_rope")


def test_explain_equals_counted_macs_without_a_class_token():
    check_macs(small_eva("rope_gap"), eva_images("rope_gap"))


def test_dynamic_image_size_follows_the_input():
    """DINOv3 builds its rotary table per input size: the track sizes itself per call."""
    model = small_eva("dinov3")
    fast = evit_patch.apply(model, layers=[1, 2], keep=1.0)
    for reorganizer in evit_patch.reorganizers(fast):
        reorganizer.reduction = Permutation()
    x = images(2, size=80)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)


def test_patch_dropout_is_refused():
    model = make_vit("eva02_tiny_patch14_224", img_size=56, depth=2, patch_drop_rate=0.5)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"Eva .*drops patches at random .*patch_drop_rate"):
        evit_patch.apply(model, layers=[1], keep=0.7)
