"""timm ``VisionTransformerRelPos``: its relative position bias (a table, or an MLP over log-spaced
offsets) reaches SDPA as ``attn_mask`` and is re-indexed by the core pass like BEiT's."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from tracked import (
    check_export,
    check_gradient_checkpointing,
    check_gradients,
    check_keep_one_is_exact,
    check_macs,
    check_matches_reference,
    check_original_untouched,
    check_permutation,
    randomise,
)

# an MLP bias without a class token (the default vit_relpos_*), a table bias ("bias") with a
# class token and average pooling, and a class-token head.
VARIANTS = {
    "mlp_gap": ("vit_relpos_medium_patch16_224", {}),
    "table_cls_gap": ("vit_relpos_base_patch16_clsgap_224", dict(rel_pos_type="bias")),
    "mlp_cls_token": ("vit_relpos_base_patch16_cls_224", {}),
}


def _small(variant="mlp_gap", dtype=torch.float64):
    name, options = VARIANTS[variant]
    return _randomise(
        make_vit(name, dtype=dtype, img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10, **options)
    )


def _randomise(model):
    randomise(model)
    with torch.no_grad():  # the MLP bias starts near zero: give it weight so positions matter
        for name, p in model.named_parameters():
            if "rel_pos.mlp" in name and name.endswith("weight"):
                p.normal_(0, 1.0)
            if name.startswith("blocks.") and ".norm" in name and name.endswith("weight"):
                p.fill_(1.0)  # post-norm blocks start their norms at 1e-5 (res-post init)
    return model


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, fuse):
    check_matches_reference("relpos", _small(variant), images(3, size=64), [1, 2], [0.6, 0.5], fuse)


def test_keep_one_is_exact():
    check_keep_one_is_exact(_small(dtype=torch.float32), images(2, size=64, dtype=torch.float32))


@pytest.mark.parametrize("variant", ["mlp_gap", "table_cls_gap"])
def test_reordered_tokens_keep_their_bias(monkeypatch, variant):
    check_permutation(_small(variant), images(2, size=64), monkeypatch, "gather_bias")


def test_post_norm_blocks_follow_positions(monkeypatch):
    """``*_rpn_*`` models use post-norm blocks; the permutation check needs no reference."""
    model = _randomise(make_vit("vit_relpos_small_patch16_rpn_224", img_size=64, depth=4, num_classes=10))
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")


def test_gradients_match_reference():
    check_gradients("relpos", _small(), images(2, size=64))


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(_small())


def test_export_matches_eager():
    check_export(_small(), images(3, size=64))


def test_shared_bias_follows_positions(monkeypatch):
    """vit_srelpos_*: one bias MLP for all blocks, passed to each; re-indexed like a per-block one."""
    model = _randomise(make_vit("vit_srelpos_small_patch16_224", img_size=64, depth=4, num_classes=10))
    assert model.shared_rel_pos is not None
    check_matches_reference("relpos", model, images(3, size=64), [1, 2], [0.6, 0.5], True)
    check_macs(model, images(1, size=64))  # the shared MLP runs once per call, outside the blocks
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")


@pytest.mark.parametrize("variant", ["mlp_gap", "table_cls_gap"])
def test_explain_equals_counted_macs(variant):
    """The bias MLP runs on the relative offsets, not the tokens: a fixed cost per block."""
    check_macs(_small(variant), images(1, size=64))


def test_gradient_checkpointing():
    check_gradient_checkpointing(_small(), images(2, size=64))
