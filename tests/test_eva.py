"""timm ``Eva`` (EVA-02, RoPE-ViT, DINOv3): rotary tables follow each surviving token's original position."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from tracked import (
    check_compile,
    check_export,
    check_gradient_checkpointing,
    check_gradients,
    check_keep_one_is_exact,
    check_macs,
    check_matches_reference,
    check_original_untouched,
    check_permutation,
    check_threads,
    randomise,
)

import evit_patch
from evit_patch.reductions.base import Permutation

# name, constructor options: class token + avg pool (EVA-02), token pool (RoPE-ViT), per-block
# "mixed" RoPE tables, class + 4 registers with dynamic image size and rotate-half (DINOv3), and
# registers only with avg pool (no class token: received-attention score).
VARIANTS = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),
    "rope_axial": ("vit_small_patch16_rope_224", dict(img_size=64, embed_dim=64, num_heads=4)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64, embed_dim=64, num_heads=4)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64, embed_dim=64, num_heads=4)),
    "rope_gap": ("vit_base_patch16_rope_reg1_gap_256", dict(img_size=64, embed_dim=64, num_heads=4)),
}


def _small(variant="eva02", dtype=torch.float64):
    name, options = VARIANTS[variant]
    return randomise(make_vit(name, dtype=dtype, depth=4, num_classes=10, **options))


def _images(variant="eva02", dtype=torch.float64):
    return images(3, size=VARIANTS[variant][1]["img_size"], dtype=dtype)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, fuse):
    check_matches_reference("eva", _small(variant), _images(variant), [1, 2], [0.6, 0.5], fuse)


@pytest.mark.parametrize("variant", ["eva02", "rope_gap"])
def test_keep_one_is_exact(variant):
    check_keep_one_is_exact(_small(variant, torch.float32), _images(variant, torch.float32))


@pytest.mark.parametrize("variant", ["eva02", "rope_mixed"])
def test_reordered_tokens_keep_their_rotation(monkeypatch, variant):
    check_permutation(_small(variant), _images(variant), monkeypatch, "gather_rope")


def test_gradients_match_reference():
    check_gradients("eva", _small(), _images())


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(_small())


@pytest.mark.parametrize("variant", ["eva02", "rope_gap"])
def test_explain_equals_counted_macs(variant):
    check_macs(_small(variant), _images(variant))


def test_fullgraph_compile_matches_eager():
    check_compile(_small(dtype=torch.float32), _images())


def test_concurrent_calls():
    check_threads(_small(), _images())


def test_dynamic_image_size_follows_the_input():
    """DINOv3 builds its rotary table per input size: the track sizes itself per call."""
    model = _small("dinov3")
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


def test_export_matches_eager():
    check_export(_small(), _images())


def test_gradient_checkpointing():
    check_gradient_checkpointing(_small(), _images())
