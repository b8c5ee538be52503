"""timm ``VisionTransformerRelPos``: its relative position bias (a table, or an MLP over log-spaced
offsets) reaches SDPA as ``attn_mask`` and is re-indexed by the core pass like BEiT's. The shared
checks run on the MLP-bias, average-pooled variant in test_families.py; here, the others."""

from __future__ import annotations

import pytest
from cases import RELPOS_VARIANTS, randomise_relpos, small_relpos
from conftest import images, make_vit
from tracked import check_macs, check_matches_reference, check_permutation


@pytest.mark.parametrize(
    "variant, fuse",
    [(v, fuse) for v in RELPOS_VARIANTS for fuse in (True, False) if (v, fuse) != ("mlp_gap", True)],  # the table
)
def test_matches_reference(variant, fuse):
    check_matches_reference("relpos", small_relpos(variant), images(3, size=64), [1, 2], [0.6, 0.5], fuse)


def test_reordered_tokens_keep_their_table_bias(monkeypatch):
    check_permutation(small_relpos("table_cls_gap"), images(2, size=64), monkeypatch, "gather_bias")


def test_post_norm_blocks_follow_positions(monkeypatch):
    """``*_rpn_*`` models use post-norm blocks; the permutation check needs no reference."""
    model = randomise_relpos(make_vit("vit_relpos_small_patch16_rpn_224", img_size=64, depth=4, num_classes=10))
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")


def test_shared_bias_follows_positions(monkeypatch):
    """vit_srelpos_*: one bias MLP for all blocks, passed to each; re-indexed like a per-block one."""
    model = randomise_relpos(make_vit("vit_srelpos_small_patch16_224", img_size=64, depth=4, num_classes=10))
    assert model.shared_rel_pos is not None
    check_matches_reference("relpos", model, images(3, size=64), [1, 2], [0.6, 0.5], True)
    check_macs(model, images(1, size=64))  # the shared MLP runs once per call, outside the blocks
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")


def test_explain_equals_counted_macs_with_a_table_bias():
    """A table bias with a class token (the MLP bias, which runs on the offsets, is the table's)."""
    check_macs(small_relpos("table_cls_gap"), images(1, size=64))
