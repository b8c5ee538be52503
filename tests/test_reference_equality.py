"""Patched models equal the explicit EViT reference (float64, 1e-9) across timm ViT variants (the
plain one, with fusion, and its gradients are the family table's: test_families.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from reference import reference_forward

import evit_patch

VARIANTS = {
    "deit": dict(name="deit_tiny_patch16_224"),
    "distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "registers": dict(name="vit_small_patch14_reg4_dinov2", img_size=112, embed_dim=96, num_heads=3),
    "clip_prenorm": dict(name="vit_base_patch32_clip_224", embed_dim=96, num_heads=3),  # narrow: the structure matters
    "layerscale_qknorm": dict(name="deit3_small_patch16_224", qk_norm=True, img_size=112, embed_dim=96, num_heads=3),
    "other_size": dict(name="deit_tiny_patch16_224", img_size=160),
}


@pytest.mark.parametrize(
    "variant, fuse",
    [*((v, True) for v in VARIANTS if v != "deit"), ("deit", False), ("registers", False)],  # no fusion: plain, prefix
    ids=lambda v: v if isinstance(v, str) else ("fuse" if v else "nofuse"),
)
def test_matches_reference(variant, fuse):
    kwargs = dict(VARIANTS[variant])
    model = make_vit(kwargs.pop("name"), **kwargs)
    x = images(2, model.patch_embed.img_size[0])
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7, fuse=fuse)
    with torch.no_grad():
        got, want = fast(x), reference_forward(model, x, [3, 6, 9], 0.7, fuse)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_manual_attention_path_matches_reference():
    """Blocks whose attention is an explicit softmax take the probabilities route."""
    model = make_vit("deit_tiny_patch16_224")
    for block in model.blocks:
        block.attn.fused_attn = False
    x = images(2)
    fast = evit_patch.apply(model, layers=[1, 4], keep=[0.5, 0.8])
    assert all(m.source.value == "probabilities" for m in evit_patch.reorganizers(fast))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference_forward(model, x, [1, 4], [0.5, 0.8]), rtol=0, atol=1e-9)


def test_per_layer_keep_and_changed_keep_match_reference():
    model = make_vit("deit_tiny_patch16_224")
    x = images(2)
    fast = evit_patch.apply(model, layers=[9, 2], keep=[0.9, 0.4])  # given out of order
    assert evit_patch.get_config(fast).to_dict() == {
        "layers": [2, 9],
        "keep": [0.4, 0.9],
        "fuse": True,
        "score": None,
        "method": "evit",
        "proportional": None,
        "cls_only": False,
        "dense": False,
    }
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference_forward(model, x, [2, 9], [0.4, 0.9]), rtol=0, atol=1e-9)
        evit_patch.set_keep(fast, 0.6)
        torch.testing.assert_close(fast(x), reference_forward(model, x, [2, 9], 0.6), rtol=0, atol=1e-9)
